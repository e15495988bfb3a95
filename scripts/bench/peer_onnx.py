#!/usr/bin/env python3
"""ONNX Runtime side of the embedding-throughput benchmark (CPUExecutionProvider).

ONNX Runtime is the engine text-embeddings-inference runs on CPU, so it is the
peer to beat there. This script builds the same pipeline tlserve serves for
all-MiniLM-L6-v2 (WordPiece tokens, BERT, mean pooling over real tokens, L2
normalisation, 256-token limit) from the local model folder:

- exports the HF AutoModel to ONNX with torch.onnx.export (the dynamo exporter,
  opset 18, dynamic batch and sequence axes) into --work-dir, once;
- derives ONNX Runtime's own dynamically quantized int8 models from it with
  onnxruntime.quantization.quantize_dynamic: default settings ("int8") and
  per output channel ("int8-per-channel", the scheme tlserve's int8 path uses
  for weights);
- checks the float model's embeddings against sentence-transformers (cosine
  >= 0.9999 on 64 sentences) before anything is timed, and that each
  quantized model still gives unit vectors near them (cosine >= 0.9);
- measures sentences per second at each batch size, tokenisation included,
  with every batch padded to its longest text, as the HF pipeline does.

Prints one JSON object per variant and batch size, in the format of tlserve's
`bench-embed` (see scripts/bench-embed.sh):

  {"engine": "onnxruntime-fp32", "batch_size": B, "sentences": N, "seconds": T,
   "sentences_per_sec": N/T, "threads": n, "versions": {...}}

With --embeddings-dir, also writes each variant's embeddings of the whole
corpus (in order, one JSON array per line) for scripts/bench/embed_accuracy.py.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from bench_args import positive_int, positive_int_list

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

VARIANTS = ("fp32", "int8", "int8-per-channel")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--corpus", required=True, help="text file, one sentence per line")
    p.add_argument("--work-dir", required=True, help="where the exported models are kept")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32, 128])
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--max-sentences", type=positive_int, default=200_000)
    p.add_argument("--max-seq-length", type=positive_int, default=256)
    p.add_argument("--embeddings-dir", help="write onnxruntime-VARIANT.jsonl here")
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def log(message):
    print(f"peer_onnx: {message}", file=sys.stderr, flush=True)


def export(model_dir, path):
    """The HF model's last hidden state as an ONNX graph with dynamic axes."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()

    class LastHiddenState(torch.nn.Module):
        # Keyword arguments: transformers 5's forward() takes more positional ones.
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    example = torch.ones(2, 8, dtype=torch.long)
    mask = example.clone()
    mask[1, 5:] = 0
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch, 1: sequence} for name in INPUTS}
    torch.onnx.export(LastHiddenState(model), (example, mask, torch.zeros_like(example)), path,
                      input_names=list(INPUTS), output_names=["last_hidden_state"],
                      dynamic_shapes=shapes, opset_version=18, dynamo=True)


def build_models(model_dir, work_dir, variants):
    os.makedirs(work_dir, exist_ok=True)
    fp32 = os.path.join(work_dir, "model.onnx")
    if not os.path.isfile(fp32):
        log(f"exporting {model_dir} to {fp32}")
        export(model_dir, fp32)
    paths = {"fp32": fp32}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for variant, per_channel in (("int8", False), ("int8-per-channel", True)):
        if variant not in variants:
            continue
        path = os.path.join(work_dir, f"model-{variant}.onnx")
        if not os.path.isfile(path):
            log(f"quantizing to {path} (per_channel={per_channel})")
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=per_channel)
        paths[variant] = path
    return paths


class Pipeline:
    """Tokenize, run, mean-pool over real tokens, normalise."""

    def __init__(self, model_path, tokenizer_path, threads, max_len):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.tokenizer.enable_truncation(max_len)
        self.tokenizer.enable_padding()

    def encode(self, sentences):
        encodings = self.tokenizer.encode_batch(sentences)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def sentence_transformers_embeddings(model_dir, sentences, max_len):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peer_embed import build_model

    model = build_model(model_dir, max_len)
    return model.encode(sentences, batch_size=len(sentences), convert_to_numpy=True)


def check(name, ours, reference, min_cosine):
    cosines = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    lowest = float(cosines.min())
    if not lowest >= min_cosine:
        sys.exit(f"peer_onnx: {name} embeddings differ from sentence-transformers "
                 f"(lowest cosine {lowest:.6f} < {min_cosine})")
    log(f"{name}: lowest cosine to sentence-transformers over {len(cosines)} sentences {lowest:.6f}")


def measure(pipeline, corpus, size, min_seconds, max_sentences):
    n = len(corpus)
    pipeline.encode([corpus[k % n] for k in range(size)])  # untimed: first call at this shape
    done, start = 0, time.perf_counter()
    while True:
        pipeline.encode([corpus[(done + k) % n] for k in range(size)])
        done += size
        elapsed = time.perf_counter() - start
        if done >= max_sentences or (elapsed >= min_seconds and done >= n):
            return done, elapsed


def versions():
    import onnxruntime
    import tokenizers
    import torch

    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "torch (export)": torch.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


def write_embeddings(pipeline, corpus, path):
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(corpus), 32):
            for vector in pipeline.encode(corpus[start:start + 32]):
                f.write(json.dumps([float(x) for x in vector]) + "\n")


def main():
    args = parse_args()
    with open(args.corpus, encoding="utf-8") as f:
        corpus = [line.strip() for line in f if line.strip()]
    if not corpus:
        sys.exit(f"peer_onnx: corpus {args.corpus} has no non-empty lines")
    tokenizer = os.path.join(args.model_dir, "tokenizer.json")
    paths = build_models(args.model_dir, args.work_dir, args.variants)
    import torch

    torch.set_num_threads(args.threads)
    reference = sentence_transformers_embeddings(args.model_dir, corpus[:64], args.max_seq_length)
    info = versions()
    max_sentences = max(args.max_sentences, len(corpus))
    for variant in args.variants:
        pipeline = Pipeline(paths[variant], tokenizer, args.threads, args.max_seq_length)
        check(variant, pipeline.encode(corpus[:64]), reference, 0.9999 if variant == "fp32" else 0.9)
        if args.embeddings_dir:
            write_embeddings(pipeline, corpus,
                             os.path.join(args.embeddings_dir, f"onnxruntime-{variant}.jsonl"))
        for size in args.batch_sizes:
            sentences, seconds = measure(pipeline, corpus, size, args.min_seconds, max_sentences)
            print(json.dumps({
                "engine": f"onnxruntime-{variant}", "batch_size": size, "sentences": sentences,
                "seconds": round(seconds, 6), "sentences_per_sec": round(sentences / seconds, 3),
                "threads": args.threads, "versions": info,
            }), flush=True)


if __name__ == "__main__":
    main()
