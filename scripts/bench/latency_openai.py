#!/usr/bin/env python3
"""One client's sequential embeddings latency through the OpenAI-compatible HTTP API.

The same calls as latency_client.py (sequential, `--batch` sentences each, after
`--warmup` unmeasured calls), over one kept-alive HTTP connection: with
`--client sdk`, the official `openai` package, as a user of the SDK meets them
(`encoding_format` is the SDK's default, base64); with `--client http`, plain
`http.client` posting the JSON and reading the answer, which is the server's
share of the round trip without the SDK's own work. Prints one JSON line:
{"client": "python-openai" or "python-http", "batch", "requests", "p50_ms",
"p99_ms", "mean_ms"}.
"""

import argparse
import http.client
import json
import sys
import urllib.parse

import openai

from latency_client import measure, report


def sdk_caller(args):
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    return lambda texts: client.embeddings.create(model=args.backbone, input=texts, timeout=30)


def http_caller(args):
    url = urllib.parse.urlsplit(args.base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    path = url.path.rstrip("/") + "/embeddings"

    def embed(texts):
        body = json.dumps({"model": args.backbone, "input": texts})
        connection.request("POST", path, body, {"content-type": "application/json"})
        answer = connection.getresponse()
        payload = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {payload[:200]!r}")
        json.loads(payload)

    return embed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--client", choices=["sdk", "http"], default="sdk")
    args = parser.parse_args()
    sentences = [l.strip() for l in open(args.corpus, encoding="utf-8") if l.strip()]

    embed = sdk_caller(args) if args.client == "sdk" else http_caller(args)
    timings = measure(embed, sentences, args)
    report("python-openai" if args.client == "sdk" else "python-http", args.batch, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
