#!/usr/bin/env python3
"""Accuracy of embedding engines against the independent float64 reference.

Every engine embedded the same corpus (one JSON array per line, in corpus
order: `tlserve bench-embed --embeddings-out`, peer_onnx.py --embeddings-dir).
The reference is tests/reference/minilm_reference.py, numpy in float64 with its
own tokenizer, run here on the same sentences.

Per engine, a markdown row with:
- the lowest and the mean cosine between its vector and the reference's, per
  sentence (the quantity the tests bound);
- retrieval: every sentence is a query against all the others; "top-1" is the
  share of queries whose nearest neighbour is the reference's, "top-10" the
  mean share of the 10 nearest neighbours in common with the reference's.

Usage: embed_accuracy.py --model-dir DIR --corpus FILE NAME=FILE.jsonl ...
Runs with numpy (the test virtualenv has it).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                         "tests", "reference", "minilm_reference.py")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--k", type=int, default=10, help="neighbours compared (default: 10)")
    p.add_argument("engines", nargs="+", metavar="NAME=FILE")
    return p.parse_args()


def reference(model_dir, sentences):
    request = json.dumps({"model_dir": model_dir, "sentences": sentences,
                          "pooling": "mean", "normalize": True})
    done = subprocess.run([sys.executable, REFERENCE], input=request, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"embed_accuracy: the reference failed: {done.stderr.strip()[-2000:]}")
    return np.array(json.loads(done.stdout)["embeddings"], dtype=np.float64)


def load(path, rows, width):
    with open(path, encoding="utf-8") as f:
        vectors = np.array([json.loads(line) for line in f if line.strip()], dtype=np.float64)
    if vectors.shape != (rows, width):
        sys.exit(f"embed_accuracy: {path} holds {vectors.shape}, expected ({rows}, {width})")
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def neighbours(vectors, k):
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def main():
    args = parse_args()
    with open(args.corpus, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    truth = reference(args.model_dir, sentences)
    truth_neighbours = neighbours(truth, args.k)
    print(f"| engine | lowest cosine | mean cosine | top-1 agreement | top-{args.k} agreement |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.engines:
        name, _, path = spec.partition("=")
        ours = load(path, *truth.shape)
        cosines = (ours * truth).sum(axis=1)
        found = neighbours(ours, args.k)
        top1 = float((found[:, 0] == truth_neighbours[:, 0]).mean())
        overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth_neighbours)])
        print(f"| {name} | {cosines.min():.5f} | {cosines.mean():.5f} | {top1:.3f} | {overlap:.3f} |")
    print()
    print(f"- {len(sentences)} sentences of {args.corpus}; reference: tests/reference/minilm_reference.py (float64)")


if __name__ == "__main__":
    main()
