#!/usr/bin/env python3
"""One client's sequential embeddings latency through the OpenAI-compatible HTTP API.

The same calls as latency_client.py (sequential, `--batch` sentences each, after
`--warmup` unmeasured calls), made with the official `openai` package over one
kept-alive HTTP connection, as a user of the SDK meets them; `encoding_format`
is the SDK's default (base64). Prints one JSON line: {"client": "python-openai",
"batch", "requests", "p50_ms", "p99_ms", "mean_ms"}.
"""

import argparse
import json
import statistics
import sys
import time

import openai

from latency_client import percentile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    sentences = [l.strip() for l in open(args.corpus, encoding="utf-8") if l.strip()]

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    timings = []
    for i in range(args.warmup + args.requests):
        start = (i * args.batch) % len(sentences)
        texts = (sentences[start:] + sentences)[: args.batch]
        began = time.perf_counter()
        client.embeddings.create(model=args.backbone, input=texts, timeout=30)
        if i >= args.warmup:
            timings.append((time.perf_counter() - began) * 1e3)
    timings.sort()
    print(json.dumps({
        "client": "python-openai",
        "batch": args.batch,
        "requests": len(timings),
        "p50_ms": round(percentile(timings, 0.50), 2),
        "p99_ms": round(percentile(timings, 0.99), 2),
        "mean_ms": round(statistics.fmean(timings), 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
