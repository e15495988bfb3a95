#!/usr/bin/env python3
"""Writes a copy of a safetensors file with every F32 tensor stored as F16.

Halves a model for transport (the GPU check's bundle); tensors of other types are
copied as they are. Both tlserve (which widens to f32 at load) and
sentence-transformers read the result. Needs numpy only.

Usage: f16_safetensors.py IN.safetensors OUT.safetensors
"""

import json
import struct
import sys

import numpy as np


def main() -> int:
    source, target = sys.argv[1], sys.argv[2]
    with open(source, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    metadata = header.pop("__metadata__", None)
    tensors, chunks, offset = {}, [], 0
    for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = data[begin:end]
        dtype = entry["dtype"]
        if dtype == "F32":
            raw = np.frombuffer(raw, dtype="<f4").astype("<f2").tobytes()
            dtype = "F16"
        tensors[name] = {"dtype": dtype, "shape": entry["shape"],
                         "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata is not None:
        tensors["__metadata__"] = metadata
    encoded = json.dumps(tensors, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for chunk in chunks:
            f.write(chunk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
