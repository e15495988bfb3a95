#!/usr/bin/env python3
"""Peer side of the embedding-throughput benchmark: sentence-transformers on PyTorch CPU.

Builds the same model tlserve serves (all-MiniLM-L6-v2: BERT, mean pooling, L2
normalisation, 256-token limit) from the local model folder, never from a hub,
and measures sentences per second at each batch size. Prints one JSON object per
line in the format tlserve's `bench-embed` subcommand prints, so that
scripts/bench-embed.sh can put the two side by side:

  {"engine": "sentence-transformers", "batch_size": B, "sentences": N,
   "seconds": T, "sentences_per_sec": N/T, "threads": n, "versions": {...}}

Every batch is exactly B sentences taken in order from the corpus, wrapping
around at its end, and is handed to encode() as one call: a service receives
batches as they come, so sentence-transformers' own length sorting only applies
inside a batch, as it would behind a real server.

Run it with the interpreter of the peer virtualenv (see
scripts/bench-embed.sh --setup-peer); nothing here is a dependency of tlserve.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

from bench_args import positive_int, positive_int_list

# Set before sentence-transformers / transformers are imported: they read these
# at import time, and the benchmark must fail rather than reach for a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True,
                   help="folder with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--corpus", required=True, help="text file, one sentence per line")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32, 128],
                   help="comma-separated (default: 1,8,32,128)")
    p.add_argument("--min-seconds", type=float, default=5.0,
                   help="measure each batch size for at least this long (default: 5)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="torch intra-op threads (default: number of cores)")
    p.add_argument("--max-sentences", type=positive_int, default=200_000,
                   help="stop a batch size after this many sentences even if "
                        "--min-seconds has not passed; raised to one full corpus "
                        "pass if smaller (default: 200000)")
    p.add_argument("--max-seq-length", type=positive_int, default=256,
                   help="token limit, as in the model's sentence_bert_config.json (default: 256)")
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu (default) or cuda, cuda:0 ... for the GPU check")
    p.add_argument("--warm-passes", type=int, default=0,
                   help="untimed passes over the corpus at each batch size before timing it "
                        "(default 0: one untimed batch); PyTorch's half precision tunes "
                        "per shape on the GPU and needs one")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the model's float type (default: float32; half types for GPUs)")
    return p.parse_args()


def read_corpus(path):
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    lines = [line for line in lines if line.strip()]
    if not lines:
        sys.exit(f"peer_embed: corpus {path} has no non-empty lines")
    return lines


def build_model(model_dir, max_seq_length, device, dtype_name):
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the modules; the old path warns
        from sentence_transformers.sentence_transformer.modules import (
            Normalize, Pooling, Transformer)
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer

    # Assembled module by module, as the folder has no modules.json: this is the
    # pipeline sentence-transformers would build for all-MiniLM-L6-v2 from the hub.
    # The asked float type whatever the file stores: recent transformers keep a
    # checkpoint's own dtype (f16 for the GPU check's halved weights).
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:  # sentence-transformers >= 6 renamed model_args
        transformer = Transformer(model_dir, max_seq_length=max_seq_length,
                                  model_kwargs={dtype_key: dtype})
    except TypeError:
        transformer = Transformer(model_dir, max_seq_length=max_seq_length,
                                  model_args={dtype_key: dtype})
    dimension = getattr(transformer, "get_embedding_dimension", None) \
        or transformer.get_word_embedding_dimension
    pooling = Pooling(dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)


def versions():
    import numpy
    import sentence_transformers
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }


def batches(corpus, size):
    """Endless stream of size-B batches, in corpus order, wrapping around."""
    n = len(corpus)
    start = 0
    while True:
        yield [corpus[(start + k) % n] for k in range(size)]
        start = (start + size) % n


def encode(model, batch):
    return model.encode(batch, batch_size=len(batch), convert_to_numpy=True,
                        show_progress_bar=False)


def check_output(embeddings, rows, tolerance):
    # A benchmark of a broken pipeline is worthless: insist on unit vectors of
    # the model's width before timing anything (within the float type's rounding).
    if embeddings.shape[0] != rows or embeddings.ndim != 2:
        sys.exit(f"peer_embed: encode returned shape {embeddings.shape} for {rows} sentences")
    norms = (embeddings.astype("float64") ** 2).sum(axis=1) ** 0.5
    if not all(math.isfinite(x) and abs(x - 1.0) < tolerance for x in norms):
        sys.exit(f"peer_embed: embeddings are not unit-normalised (norms {norms[:4]}...)")


def measure(model, corpus, size, min_seconds, max_sentences, warm_passes):
    stream = batches(corpus, size)
    # Untimed batches at this size: the first call at a new shape pays for
    # allocations (and on a GPU, in half precision, for tuning) that a
    # long-running service pays once.
    for _ in range(max(1, warm_passes * len(corpus) // size)):
        encode(model, next(stream))
    stream = batches(corpus, size)

    done = 0
    start = time.perf_counter()
    while True:
        encode(model, next(stream))
        done += size
        elapsed = time.perf_counter() - start
        if done >= max_sentences:
            break
        if elapsed >= min_seconds and done >= len(corpus):
            break
    return done, elapsed


def main():
    args = parse_args()
    corpus = read_corpus(args.corpus)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"peer_embed: no config.json in model dir {args.model_dir}")
    # The cap bounds a run's length, but never below one full pass: every batch
    # size must see every sentence at least once.
    max_sentences = max(args.max_sentences, len(corpus))

    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args.model_dir, args.max_seq_length, args.device, args.dtype)
    model.eval()
    info = versions()
    threads = torch.get_num_threads()

    with torch.inference_mode():
        warm = corpus[:64]
        check_output(encode(model, warm), len(warm), 1e-3 if args.dtype == "float32" else 1e-2)
        for size in args.batch_sizes:
            sentences, seconds = measure(model, corpus, size, args.min_seconds, max_sentences,
                                         args.warm_passes)
            print(json.dumps({
                "engine": "sentence-transformers",
                "batch_size": size,
                "sentences": sentences,
                "seconds": round(seconds, 6),
                "sentences_per_sec": round(sentences / seconds, 3),
                "threads": threads,
                "dtype": args.dtype,
                "versions": info,
            }), flush=True)


if __name__ == "__main__":
    main()
