#!/usr/bin/env python3
"""Independent float64 reference for EfficientNet-Lite0 image classification.

The Rust server is checked against this script, so it deliberately shares no
code with it or with the usual Python stack: the safetensors reader and the
network are written here from scratch with numpy and the standard library
(Pillow is used only to decode and resize images, as torchvision does), and
the forward pass runs in float64 so that the reference's own rounding error is
negligible next to the server's float32 arithmetic.

The weights are lukemelas' EfficientNet-PyTorch layout of the TF EfficientNet-
Lite0 ImageNet checkpoint (_conv_stem, _bn0, _blocks.N.{_expand_conv, _bn0,
_depthwise_conv, _bn1, _project_conv, _bn2}, _conv_head, _bn1, _fc). Lite
differs from EfficientNet-B0 by having no squeeze-excitation, ReLU6 instead of
swish, and a fixed 32-channel stem and 1280-channel head. Every convolution
pads like TF "SAME" (lukemelas' Conv2dStaticSamePadding): out = ceil(in /
stride), the total padding max((out - 1) * stride + k - in, 0) split with the
smaller half before, so a stride-2 3x3 convolution of 224 pixels pads 0 before
and 1 after. "padding": "symmetric" pads k // 2 on both sides instead (what
nn.Conv2d(padding=k // 2) would do), only to compare the two.

Protocol: one JSON object on stdin,
    {"weights": "<path to model.safetensors>",
     "images": ["<path>", ...],          # optional: encoded image files
     "tensors": [[3*H*W floats], ...],   # optional: preprocessed, CHW row-major
     "preprocess": {"resize_shorter": 256, "crop": 224,
                    "resample": "bicubic" | "bilinear" | "nearest",
                    "mean": [r, g, b], "std": [r, g, b]},
     "return_pixels": false, "forward": true,
     "padding": "same" | "symmetric"}
and one JSON object on stdout,
    {"pixels": [[3*crop*crop floats], ...],   # only when return_pixels
     "features": [[1280 floats], ...],        # only when forward
     "logits": [[1000 floats], ...]}          # only when forward
with one entry per input, images first, then tensors. "features" are the
global average of the head's ReLU6 activations (the input of _fc), "logits"
the _fc outputs before any softmax. Every key but "weights"
is optional (defaults as shown; "weights" may be left out when "forward" is
false; preprocess defaults to 256/224/bicubic, mean 0.498 and std 0.502, the
TF Lite normalisation (pixel - 127) / 128 the model was trained with). Tensors
must be square, H = W = crop. Errors go to stderr with a non-zero exit status.

Preprocessing is torchvision's Resize(resize_shorter) + CenterCrop(crop) +
ToTensor() + Normalize(mean, std) on a PIL image: open, apply the EXIF
orientation, convert("RGB") (alpha is dropped, not composited), resize with
PIL so that the shorter side is resize_shorter and the longer side
int(resize_shorter * long / short), crop at top = int(round((h - crop) / 2)),
left likewise (zero-padding first, as torchvision does, if the image is
smaller than the crop), then x / 255, (x - mean) / std per channel.
"pixels" are those network inputs, CHW row-major.

By hand: `efficientnet_lite_reference.py --demo` prints the top-5 ImageNet
classes of the test photos in models/test-images (scripts/fetch-test-images.sh).
"""

import argparse
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

# The arrays here are small, so BLAS threads mostly fight each other (and a
# concurrent cargo build) for the CPU; one thread is faster on a busy machine
# and makes the output bit-for-bit repeatable. Must be set before numpy loads
# OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = ROOT / "models" / "efficientnet-lite0" / "model.safetensors"
DEFAULT_IMAGES_DIR = ROOT / "models" / "test-images"
CLASS_NAMES = ROOT / "assets" / "imagenet-classes.txt"

DEFAULT_PREPROCESS = {
    "resize_shorter": 256,
    "crop": 224,
    "resample": "bicubic",
    # EfficientNet-Lite was trained on (pixel - 127) / 128 for pixels in
    # 0..255, i.e. about (x - 0.498) / 0.502 for x in 0..1.
    "mean": [0.498, 0.498, 0.498],
    "std": [0.502, 0.502, 0.502],
}

BN_EPS = 1e-3

# EfficientNet-Lite0 block groups: (repeats, kernel, stride, expand ratio,
# input filters, output filters), from lukemelas' block strings
# r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320 (width and depth multipliers
# are 1.0 for Lite0). Only the first block of a group has the stride and the
# group's input filters; its repeats have stride 1 and input = output filters.
BLOCK_GROUPS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000


class ReferenceInputError(Exception):
    """A problem with the input or the model files, reported without a traceback."""


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

# Only the dtypes numpy represents exactly; anything else (BF16, F8, ...) would
# need a conversion that could itself be wrong, so it is refused.
SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


class SafeTensors:
    """Reads tensors from a .safetensors file.

    Layout: u64 little-endian header size N, N bytes of JSON mapping each
    tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets are
    relative to the end of the header), then the raw little-endian data.
    """

    def __init__(self, path):
        data = Path(path).read_bytes()
        if len(data) < 8:
            raise ReferenceInputError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", data[:8])
        if 8 + header_len > len(data):
            raise ReferenceInputError(f"{path}: header length {header_len} exceeds file size")
        try:
            header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReferenceInputError(f"{path}: unreadable safetensors header: {err}") from err
        header.pop("__metadata__", None)
        self.path = path
        self.header = header
        self.data = memoryview(data)[8 + header_len :]

    def __contains__(self, name):
        return name in self.header

    def get(self, name, shape=None):
        """Returns the named tensor as a float64 array, checking its shape if given."""
        try:
            info = self.header[name]
        except KeyError:
            raise ReferenceInputError(f"{self.path}: no tensor named {name!r}") from None
        dtype = info["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ReferenceInputError(
                f"{self.path}: tensor {name!r} has dtype {dtype}; "
                f"only {', '.join(SAFETENSORS_DTYPES)} are supported"
            )
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        stored_shape = tuple(info["shape"])
        if shape is not None and stored_shape != tuple(shape):
            raise ReferenceInputError(
                f"{self.path}: tensor {name!r} has shape {list(stored_shape)}, expected {list(shape)}"
            )
        begin, end = info["data_offsets"]
        expected = math.prod(stored_shape) * np_dtype.itemsize
        if end - begin != expected or end > len(self.data):
            raise ReferenceInputError(
                f"{self.path}: tensor {name!r} spans bytes [{begin}, {end}) "
                f"but shape {list(stored_shape)} of {dtype} needs {expected}"
            )
        array = np.frombuffer(self.data[begin:end], dtype=np_dtype).reshape(stored_shape)
        return array.astype(np.float64)


# ---------------------------------------------------------------------------
# Network (activations are HWC: channels last, so 1x1 convolutions are matmuls)
# ---------------------------------------------------------------------------


def pad_amounts(size, k, stride, padding):
    """(before, after, out) padding of one spatial dimension."""
    if padding == "same":
        out = -(-size // stride)  # ceil
        total = max((out - 1) * stride + k - size, 0)
        before = total // 2
        return before, total - before, out
    before = after = k // 2
    return before, after, (size + before + after - k) // stride + 1


def pad_hw(x, k, stride, padding):
    """Zero-pads x [H, W, C] for a k x k convolution; returns (padded, Ho, Wo)."""
    h, w, _ = x.shape
    top, bottom, ho = pad_amounts(h, k, stride, padding)
    left, right, wo = pad_amounts(w, k, stride, padding)
    return np.pad(x, ((top, bottom), (left, right), (0, 0))), ho, wo


def conv2d(x, weight, stride, padding):
    """Dense convolution: x [H, W, Cin], weight [Cout, Cin, k, k] (PyTorch layout), no bias."""
    k = weight.shape[2]
    if k == 1 and stride == 1:
        return x @ weight[:, :, 0, 0].T
    xp, ho, wo = pad_hw(x, k, stride, padding)
    out = np.zeros((ho, wo, weight.shape[0]))
    # Sum over the k*k taps: each is a strided view of the input times a [Cin, Cout] matrix.
    for i in range(k):
        for j in range(k):
            tap = xp[i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            out += tap @ weight[:, :, i, j].T
    return out


def depthwise_conv2d(x, weight, stride, padding):
    """Per-channel convolution: x [H, W, C], weight [C, 1, k, k], no bias."""
    k = weight.shape[2]
    xp, ho, wo = pad_hw(x, k, stride, padding)
    out = np.zeros((ho, wo, x.shape[2]))
    for i in range(k):
        for j in range(k):
            tap = xp[i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            out += tap * weight[:, 0, i, j]
    return out


def relu6(x):
    return np.clip(x, 0.0, 6.0)


class BatchNorm:
    """Inference batch norm from running statistics, folded to scale and shift."""

    def __init__(self, weights, prefix, channels):
        gamma = weights.get(prefix + ".weight", (channels,))
        beta = weights.get(prefix + ".bias", (channels,))
        mean = weights.get(prefix + ".running_mean", (channels,))
        var = weights.get(prefix + ".running_var", (channels,))
        self.scale = gamma / np.sqrt(var + BN_EPS)
        self.shift = beta - mean * self.scale

    def __call__(self, x):
        return x * self.scale + self.shift


class EfficientNetLite:
    def __init__(self, path):
        w = SafeTensors(path)
        self.stem = w.get("_conv_stem.weight", (STEM_FILTERS, 3, 3, 3))
        self.stem_bn = BatchNorm(w, "_bn0", STEM_FILTERS)
        self.blocks = []
        n = 0
        for repeats, k, stride, expand, filters_in, filters_out in BLOCK_GROUPS:
            for r in range(repeats):
                if r > 0:
                    filters_in, stride = filters_out, 1
                self.blocks.append(self.load_block(w, f"_blocks.{n}.", k, stride, expand, filters_in, filters_out))
                n += 1
        if f"_blocks.{n}._depthwise_conv.weight" in w:
            raise ReferenceInputError(f"{path}: has more than the {n} blocks of EfficientNet-Lite0")
        self.head = w.get("_conv_head.weight", (HEAD_FILTERS, BLOCK_GROUPS[-1][5], 1, 1))
        self.head_bn = BatchNorm(w, "_bn1", HEAD_FILTERS)
        self.fc_weight = w.get("_fc.weight", (NUM_CLASSES, HEAD_FILTERS))
        self.fc_bias = w.get("_fc.bias", (NUM_CLASSES,))

    @staticmethod
    def load_block(w, p, k, stride, expand, filters_in, filters_out):
        hidden = filters_in * expand
        block = {"stride": stride, "residual": stride == 1 and filters_in == filters_out}
        if expand != 1:
            block["expand"] = w.get(p + "_expand_conv.weight", (hidden, filters_in, 1, 1))
            block["expand_bn"] = BatchNorm(w, p + "_bn0", hidden)
        elif p + "_expand_conv.weight" in w:
            raise ReferenceInputError(f"unexpected {p}_expand_conv.weight in a block with expand ratio 1")
        block["depthwise"] = w.get(p + "_depthwise_conv.weight", (hidden, 1, k, k))
        block["depthwise_bn"] = BatchNorm(w, p + "_bn1", hidden)
        block["project"] = w.get(p + "_project_conv.weight", (filters_out, hidden, 1, 1))
        block["project_bn"] = BatchNorm(w, p + "_bn2", filters_out)
        if p + "_se_reduce.weight" in w:
            raise ReferenceInputError(f"{p}: has squeeze-excitation weights; this is not a Lite model")
        return block

    def forward(self, image, padding="same"):
        """image [3, H, W] -> (features [1280], logits [1000])."""
        x = np.ascontiguousarray(np.asarray(image, dtype=np.float64).transpose(1, 2, 0))
        x = relu6(self.stem_bn(conv2d(x, self.stem, 2, padding)))
        for block in self.blocks:
            inputs = x
            if "expand" in block:
                x = relu6(block["expand_bn"](conv2d(x, block["expand"], 1, padding)))
            x = relu6(block["depthwise_bn"](depthwise_conv2d(x, block["depthwise"], block["stride"], padding)))
            # No activation after the projection (a linear bottleneck).
            x = block["project_bn"](conv2d(x, block["project"], 1, padding))
            if block["residual"]:
                x = x + inputs
        x = relu6(self.head_bn(conv2d(x, self.head, 1, padding)))
        features = x.mean(axis=(0, 1))
        logits = self.fc_weight @ features + self.fc_bias
        return features, logits


# ---------------------------------------------------------------------------
# Preprocessing (torchvision transforms on PIL images)
# ---------------------------------------------------------------------------


def check_preprocess(options):
    unknown = set(options) - set(DEFAULT_PREPROCESS)
    if unknown:
        raise ReferenceInputError(f"unknown preprocess keys: {sorted(unknown)}")
    p = {**DEFAULT_PREPROCESS, **options}
    for key in ("resize_shorter", "crop"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            raise ReferenceInputError(f"preprocess.{key} must be a positive integer, got {p[key]!r}")
    if p["resample"] not in ("bicubic", "bilinear", "nearest"):
        raise ReferenceInputError(f"preprocess.resample must be bicubic, bilinear or nearest, got {p['resample']!r}")
    for key in ("mean", "std"):
        v = p[key]
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v)):
            raise ReferenceInputError(f"preprocess.{key} must be a list of 3 numbers, got {v!r}")
    if any(c == 0 for c in p["std"]):
        raise ReferenceInputError("preprocess.std must not contain 0")
    return p


def load_image(path, p):
    """Decodes, resizes and crops one image; returns uint8 [crop, crop, 3]."""
    from PIL import Image, ImageOps  # only needed for images, not for tensors

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[p["resample"]]
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ReferenceInputError(f"{path}: cannot decode image: {err}") from err

    # Resize(int): the shorter side becomes resize_shorter, the longer side is
    # scaled in proportion and truncated (torchvision's
    # _compute_resized_output_size). A same-size resize is a no-op there and a
    # copy in PIL.
    w, h = img.size
    size = p["resize_shorter"]
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    pixels = np.asarray(img, dtype=np.uint8)

    # CenterCrop: an image smaller than the crop is first zero-padded
    # ((crop - size) // 2 before, the rest after), as torchvision does.
    crop = p["crop"]
    h, w = pixels.shape[:2]
    if crop > h or crop > w:
        pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
        pixels = np.pad(pixels, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return pixels[top : top + crop, left : left + crop, :]


def normalize(pixels, p):
    """uint8 [H, W, 3] -> float64 [3, H, W]: x / 255, then (x - mean) / std."""
    x = pixels.astype(np.float64) / 255.0
    x = (x - np.array(p["mean"], dtype=np.float64)) / np.array(p["std"], dtype=np.float64)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def tensor_input(values, crop, index):
    if not isinstance(values, list) or len(values) != 3 * crop * crop:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ReferenceInputError(f"tensors[{index}] must be a list of 3*{crop}*{crop} = {3 * crop * crop} numbers, got {got}")
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ReferenceInputError(f"tensors[{index}] must hold only numbers: {err}") from err
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ReferenceInputError(f"tensors[{index}] must be a flat list of finite numbers")
    return array.reshape(3, crop, crop)


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------

REQUEST_KEYS = {"weights", "images", "tensors", "preprocess", "return_pixels", "forward", "padding"}


def run(request):
    unknown = set(request) - REQUEST_KEYS
    if unknown:
        raise ReferenceInputError(f"unknown request keys: {sorted(unknown)}")
    images = request.get("images", [])
    tensors = request.get("tensors", [])
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise ReferenceInputError("'images' must be a list of file paths")
    if not isinstance(tensors, list):
        raise ReferenceInputError("'tensors' must be a list of lists of numbers")
    flags = {key: request.get(key, default) for key, default in (("return_pixels", False), ("forward", True))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ReferenceInputError(f"'{key}' must be true or false")
    padding = request.get("padding", "same")
    if padding not in ("same", "symmetric"):
        raise ReferenceInputError(f"'padding' must be 'same' or 'symmetric', got {padding!r}")
    preprocess = request.get("preprocess", {})
    if not isinstance(preprocess, dict):
        raise ReferenceInputError("'preprocess' must be an object")
    p = check_preprocess(preprocess)

    inputs = [normalize(load_image(path, p), p) for path in images]
    inputs += [tensor_input(values, p["crop"], i) for i, values in enumerate(tensors)]

    response = {}
    if flags["return_pixels"]:
        response["pixels"] = [x.ravel().tolist() for x in inputs]
    if flags["forward"]:
        if "weights" not in request or not isinstance(request["weights"], str):
            raise ReferenceInputError("request needs 'weights' (path to model.safetensors) when 'forward' is true")
        model = EfficientNetLite(request["weights"])
        outputs = [model.forward(x, padding) for x in inputs]
        response["features"] = [f.tolist() for f, _ in outputs]
        response["logits"] = [l.tolist() for _, l in outputs]
    return response


def run_protocol():
    try:
        request = json.load(sys.stdin)
    except json.JSONDecodeError as err:
        raise ReferenceInputError(f"stdin is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise ReferenceInputError("stdin must hold a JSON object")
    # json writes floats with repr(), the shortest string that round-trips,
    # so no precision is lost on the way to the Rust test.
    json.dump(run(request), sys.stdout)
    sys.stdout.write("\n")


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def run_demo(weights, images_dir, padding, mean, std):
    names = CLASS_NAMES.read_text(encoding="utf-8").splitlines()
    paths = sorted(str(p) for p in Path(images_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise ReferenceInputError(f"no images in {images_dir} (run scripts/fetch-test-images.sh)")
    p = check_preprocess({"mean": mean, "std": std})
    model = EfficientNetLite(weights)
    for path in paths:
        start = time.perf_counter()
        _, logits = model.forward(normalize(load_image(path, p), p), padding)
        elapsed = time.perf_counter() - start
        probs = softmax(logits)
        print(f"{Path(path).name} ({elapsed:.2f} s)")
        for i in np.argsort(-logits)[:5]:
            print(f"  {i:4d} {probs[i]:.4f} {names[i]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="classify the test photos and print the top 5")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="model.safetensors for --demo")
    parser.add_argument("--images-dir", default=str(DEFAULT_IMAGES_DIR), help="photos for --demo")
    parser.add_argument("--padding", choices=("same", "symmetric"), default="same", help="for --demo")
    parser.add_argument("--mean", type=float, nargs=3, default=DEFAULT_PREPROCESS["mean"], help="for --demo")
    parser.add_argument("--std", type=float, nargs=3, default=DEFAULT_PREPROCESS["std"], help="for --demo")
    args = parser.parse_args()
    try:
        if args.demo:
            run_demo(args.weights, args.images_dir, args.padding, args.mean, args.std)
        else:
            run_protocol()
    except (ReferenceInputError, OSError) as err:
        print(f"efficientnet_lite_reference: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
