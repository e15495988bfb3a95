#!/usr/bin/env python3
"""A minimal Python client for tlserve: generates stubs from proto/ and calls Embed.

Usage:
    python tests/clients/python_embed.py --addr localhost:50051 "A cat sits on the mat."

Prints {"backbone", "dimension", "embeddings": [[...], ...]} as JSON. Needs grpcio and
grpcio-tools (scripts/setup-python.sh installs them into .venv).
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]


def generate_stubs(out_dir: pathlib.Path) -> None:
    """Compiles proto/ into Python modules under out_dir with grpc_tools.protoc."""
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos],
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="localhost:50051", help="server host:port")
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        generate_stubs(pathlib.Path(out))
        sys.path.insert(0, out)
        import grpc
        from tlserve.v1 import embedder_pb2, embedder_pb2_grpc, inputs_pb2

        with grpc.insecure_channel(args.addr) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            request = embedder_pb2.EmbedRequest(
                backbone=args.backbone,
                inputs=[inputs_pb2.Input(text=t) for t in args.texts],
            )
            response = stub.Embed(request, timeout=60)

    vectors = [list(e.values) for e in response.embeddings]
    # The default backbone normalizes: every vector must have unit length.
    for v in vectors:
        assert len(v) == response.dimension, "vector length differs from dimension"
        assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-4, "vector is not unit length"
    json.dump({"backbone": response.backbone, "dimension": response.dimension,
               "embeddings": vectors}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
