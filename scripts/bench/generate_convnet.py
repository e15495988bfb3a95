#!/usr/bin/env python3
"""Writes ResNet-50 or VGG16 weights in torchvision's layout with pseudo-random values.

No pretrained ResNet-50 or VGG16 is fetchable here, and the speed of a forward
pass does not depend on the values, so the throughput benchmark runs on these.
numpy and the standard library only; the safetensors file is written by hand
(an 8-byte little-endian header length, a JSON header, then the raw float32
data).

Usage: generate_convnet.py resnet50|vgg16 OUT_DIR [--features-only]
  writes OUT_DIR/model.safetensors; --features-only leaves out ResNet-50's fc
  and VGG16's classifier (which tests of the convolutional features skip).
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np


def resnet50_shapes():
    shapes = {}

    def conv(name, out_c, in_c, k):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)

    def bn(name, c):
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{part}"] = (c,)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_c = 64
    for layer, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            conv(f"{prefix}.conv1", width, in_c, 1)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            bn(f"{prefix}.bn2", width)
            conv(f"{prefix}.conv3", width * 4, width, 1)
            bn(f"{prefix}.bn3", width * 4)
            if block == 0:
                conv(f"{prefix}.downsample.0", width * 4, in_c, 1)
                bn(f"{prefix}.downsample.1", width * 4)
            in_c = width * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def vgg16_shapes():
    """torchvision's vgg16: features.N for the 13 convolutions (with bias),
    classifier.{0,3,6} for the three dense layers."""
    shapes = {}
    in_c, index = 3, 0
    for out_c in [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0]:
        if out_c == 0:  # max pool
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (out_c, in_c, 3, 3)
        shapes[f"features.{index}.bias"] = (out_c,)
        in_c, index = out_c, index + 2
    for name, (out_f, in_f) in {"classifier.0": (4096, 512 * 7 * 7), "classifier.3": (4096, 4096),
                                "classifier.6": (1000, 4096)}.items():
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)
    return shapes


ARCHITECTURES = {"resnet50": resnet50_shapes, "vgg16": vgg16_shapes}


def main():
    args = sys.argv[1:]
    features_only = "--features-only" in args
    args = [a for a in args if a != "--features-only"]
    if len(args) != 2 or args[0] not in ARCHITECTURES:
        sys.exit(__doc__)
    shapes = ARCHITECTURES[args[0]]()
    if features_only:
        shapes = {k: v for k, v in shapes.items() if not k.startswith(("fc.", "classifier."))}
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header, blobs, offset = {}, [], 0
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.startswith(("features.", "classifier.")) and len(shape) == 1:
            value = rng.uniform(-0.1, 0.1, shape)  # VGG's biases
        elif len(shape) == 1:
            value = rng.uniform(-0.1, 0.1, shape) + (1.0 if name.endswith("weight") else 0.0)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape)
        blob = value.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = out / "model.safetensors"
    with open(path.with_suffix(".partial"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    path.with_suffix(".partial").rename(path)
    print(path)


if __name__ == "__main__":
    main()
