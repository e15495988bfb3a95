#!/usr/bin/env python3
"""Independent reader of PyTorch's legacy (non-zip) .pth format, numpy + stdlib only.

Usage: python tests/reference/legacy_pth_reference.py FILE.pth
Prints JSON: {name: {"shape": [...], "dtype": "float32"|"int64", "sum": s,
"sum_sq": q, "first": [v0, v1, v2, v3]}} for every tensor of the state dict, the
values taken in row-major order of the (possibly strided) view.

The format (torch/serialization.py, _legacy_load): five pickles in a row (magic
number, protocol version, sys info, the object, the storage keys), then each
storage in key order as a little-endian int64 element count and the raw data.
"""

import io
import json
import pickle
import struct
import sys

import numpy as np

DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
          "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32,
          "ByteStorage": np.uint8}


class StorageRef:
    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class StateDict(dict):
    """OrderedDict stand-in that also takes the attributes torch sets (_metadata)."""


def rebuild_tensor_v2(storage, offset, size, stride, *_rest):
    return TensorRef(storage, offset, size, stride)


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor_v2
        if module == "torch" and name in DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return StateDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        _, storage_type, key, _location, _numel, *_ = pid
        return StorageRef(key, DTYPES[storage_type])


def main(path):
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)
    magic = pickle.load(stream)
    assert magic == 0x1950A86A20F9469CFC6C, "not a legacy torch file"
    pickle.load(stream)  # protocol version
    pickle.load(stream)  # sys info
    state = Unpickler(stream).load()
    keys = pickle.load(stream)
    dtypes = {}
    for value in state.values():
        if isinstance(value, TensorRef):
            dtypes[value.storage.key] = value.storage.dtype
    storages = {}
    for key in keys:
        (count,) = struct.unpack("<q", stream.read(8))
        dtype = np.dtype(dtypes[key])
        storages[key] = np.frombuffer(stream.read(count * dtype.itemsize), dtype=dtype)
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, TensorRef):
            continue
        base = storages[ref.storage.key]
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride])
        flat = np.ascontiguousarray(view).reshape(-1)
        as64 = flat.astype(np.float64)
        out[name] = {"shape": list(ref.size), "dtype": str(base.dtype),
                     "sum": float(as64.sum()), "sum_sq": float((as64 * as64).sum()),
                     "first": [float(v) for v in as64[:4]]}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
