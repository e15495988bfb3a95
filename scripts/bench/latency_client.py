#!/usr/bin/env python3
"""One client's sequential Embed latency, as a Python grpcio user meets it.

Sends `--requests` Embed calls one after another, each with `--batch`
sentences from the corpus, over one channel, after `--warmup` unmeasured
calls. Prints one JSON line: {"client": "python-grpcio", "batch", "requests",
"p50_ms", "p99_ms", "mean_ms"}. Needs grpcio and grpcio-tools (the test venv).
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def generate_stubs(out_dir: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos],
        check=True,
    )


def percentile(sorted_ms, q):
    index = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return sorted_ms[index]


def measure(call, sentences, args, prepare=lambda texts: texts):
    """Times `call(prepare(texts))` for `args.requests` calls of `args.batch`
    sentences, taken in corpus order, after `args.warmup` unmeasured ones;
    only `call` is timed. Returns the sorted round trips in milliseconds."""
    timings = []
    for i in range(args.warmup + args.requests):
        start = (i * args.batch) % len(sentences)
        request = prepare((sentences[start:] + sentences)[: args.batch])
        began = time.perf_counter()
        call(request)
        if i >= args.warmup:
            timings.append((time.perf_counter() - began) * 1e3)
    return sorted(timings)


def report(client, batch, timings):
    """Prints the one JSON line the benchmark scripts read."""
    print(json.dumps({
        "client": client,
        "batch": batch,
        "requests": len(timings),
        "p50_ms": round(percentile(timings, 0.50), 2),
        "p99_ms": round(percentile(timings, 0.99), 2),
        "mean_ms": round(statistics.fmean(timings), 2),
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    sentences = [l.strip() for l in open(args.corpus, encoding="utf-8") if l.strip()]

    with tempfile.TemporaryDirectory() as out:
        generate_stubs(pathlib.Path(out))
        sys.path.insert(0, out)
        import grpc
        from tlserve.v1 import embedder_pb2, embedder_pb2_grpc, inputs_pb2

        with grpc.insecure_channel(args.addr) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            timings = measure(
                lambda request: stub.Embed(request, timeout=30),
                sentences,
                args,
                prepare=lambda texts: embedder_pb2.EmbedRequest(
                    backbone=args.backbone, inputs=[inputs_pb2.Input(text=t) for t in texts]
                ),
            )
    report("python-grpcio", args.batch, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
