#!/usr/bin/env python3
"""Groups a `perf report --stdio --sort symbol` listing into kinds of work.

Reads the report on stdin and prints one JSON object: the share of samples per
category. The categories follow docs/PERFORMANCE.md: matrix products, the
image engine's depthwise kernel, im2col and decoding/resizing, GELU's
erf, softmax's exp, other element-wise maths, copies and layout changes,
memory (fresh pages for new tensors), thread synchronisation, reading
/proc/cpuinfo (which something in the candle path does per operation), and
the rest.
"""

import json
import re
import sys

CATEGORIES = [
    ("matmul", re.compile(r"gemm|amx::|int8::x86::(vnni|avx2)|bf16::x86::kernel|portable_tile|packed::x86")),
    # The image backbones' native engine: depthwise kernel, gathered rows of
    # k x k convolutions (im2col), decoding and resizing of the photos.
    ("depthwise", re.compile(r"depthwise")),
    ("gather_im2col", re.compile(r"input_rows")),
    ("decode_resize", re.compile(r"fdeflate|png::|zune_jpeg|jpeg|inflate|fast_image_resize|imageops|resize")),
    # int8 / bf16: converting inputs before and rescaling results after the products
    ("quantize_rescale", re.compile(r"quantize_rows|convert_rows|rescale_rows|add_bias")),
    ("gelu_erf", re.compile(r"erf")),
    ("softmax_exp", re.compile(r"expf|xflowf|__exp")),
    ("copies_layout", re.compile(r"memmove|memcpy|copy_strided|copy2d|index_select|contiguous")),
    ("memory_pages", re.compile(r"page|alloc|mm_fault|memcg|lruvec|mas_walk|vma|memset|unmap|folio|_raw_spin_unlock|list_del")),
    ("thread_sync", re.compile(r"Barrier|trampoline|rust_begin_short_backtrace|rayon|spin|futex|sched|yield|task_switch|syscall")),
    ("proc_cpuinfo", re.compile(r"cpuinfo|vsnprintf|seq_printf|format_decode|number\b|string\b")),
    ("elementwise", re.compile(r"binary_map|unary_map|Map1|Map2|vec_sum|vec_dot|layer_norm|LayerNorm|softmax|reduce|affine|where_cond|apply|call_mut")),
]


def main():
    shares = {name: 0.0 for name, _ in CATEGORIES}
    shares["other"] = 0.0
    for line in sys.stdin:
        m = re.match(r"\s*([0-9.]+)%\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        percent, symbol = float(m.group(1)), m.group(2).strip()
        for name, pattern in CATEGORIES:
            if pattern.search(symbol):
                shares[name] += percent
                break
        else:
            shares["other"] += percent
    print(json.dumps({k: round(v, 1) for k, v in shares.items()}))


if __name__ == "__main__":
    main()
