#!/usr/bin/env python3
"""Independent float64 reference for ResNet-50 and VGG16 features.

The Rust server is checked against this script on weights in torchvision's
layout, so the networks are written here from scratch with numpy (the
safetensors reader and the convolution are those of the EfficientNet-Lite
reference beside it, which shares no code with the server either), in
float64 so that the reference's own rounding error is negligible next to the
server's float32 arithmetic.

- ResNet-50, torchvision's "v1.5": conv1 7x7/2 (padding 3) + bn1 + ReLU, max
  pool 3x3/2 (padding 1, which never wins), then 3, 4, 6 and 3 bottlenecks
  (conv1 1x1 + bn1 + ReLU, conv2 3x3 with the stage's stride + bn2 + ReLU,
  conv3 1x1 + bn3, plus the input or downsample.{0,1} of it, then ReLU),
  batch norm from the running statistics with eps 1e-5; the features are the
  global average of the last map (2048 values, the input of `fc`).
- VGG16: features.N, thirteen 3x3 convolutions with bias and ReLU, a 2x2/2
  max pool after the 2nd, 4th, 7th, 10th and 13th; "pool5" features are the
  global average of the last map (512 values); "fc7" flattens the 7x7 map
  channels first, as torchvision does, then classifier.0 + ReLU and
  classifier.3 + ReLU (4096 values).

Protocol: one JSON object on stdin,
    {"weights": "<path to model.safetensors>",
     "architecture": "resnet50" | "vgg16",
     "features": "pool5" | "fc7",           # VGG16 only; default fc7
     "tensors": [[3*H*W floats], ...]}      # CHW row-major, square
and one JSON object on stdout, {"features": [[...], ...]}, one per tensor.
Errors go to stderr with a non-zero exit status.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite_reference import ReferenceInputError, SafeTensors, conv2d  # noqa: E402

RESNET_STAGES = [(3, 64), (4, 128), (6, 256), (3, 512)]
VGG_LAYOUT = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0]


def batch_norm(x, w, prefix, eps=1e-5):
    channels = x.shape[-1]
    gamma = w.get(f"{prefix}.weight", (channels,))
    beta = w.get(f"{prefix}.bias", (channels,))
    mean = w.get(f"{prefix}.running_mean", (channels,))
    var = w.get(f"{prefix}.running_var", (channels,))
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def max_pool(x, k, stride, pad):
    """x [H, W, C]; padding never wins (minus infinity), floor of the size."""
    h, w, c = x.shape
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.full((ho, wo, c), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :])
    return out


def relu(x):
    return np.maximum(x, 0.0)


def conv(x, w, name, cout, stride):
    """torchvision's convolutions pad k // 2 on every side: "symmetric"."""
    cin = x.shape[-1]
    weight = w.get(f"{name}.weight")
    k = weight.shape[-1]
    if weight.shape != (cout, cin, k, k):
        raise ReferenceInputError(f"{name}.weight has shape {list(weight.shape)}, expected [{cout}, {cin}, {k}, {k}]")
    return conv2d(x, weight, stride, "symmetric")


def resnet50(x, w):
    x = relu(batch_norm(conv(x, w, "conv1", 64, 2), w, "bn1"))
    x = max_pool(x, 3, 2, 1)
    for stage, (blocks, width) in enumerate(RESNET_STAGES, start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = relu(batch_norm(conv(x, w, f"{p}.conv1", width, 1), w, f"{p}.bn1"))
            out = relu(batch_norm(conv(out, w, f"{p}.conv2", width, stride), w, f"{p}.bn2"))
            out = batch_norm(conv(out, w, f"{p}.conv3", width * 4, 1), w, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in w:
                x = batch_norm(conv(x, w, f"{p}.downsample.0", width * 4, stride), w, f"{p}.downsample.1")
            x = relu(out + x)
    return x.mean(axis=(0, 1))


def vgg16(x, w, features):
    index = 0
    for out_c in VGG_LAYOUT:
        if out_c == 0:
            x = max_pool(x, 2, 2, 0)
            index += 1
            continue
        x = relu(conv(x, w, f"features.{index}", out_c, 1) + w.get(f"features.{index}.bias", (out_c,)))
        index += 2
    if features == "pool5":
        return x.mean(axis=(0, 1))
    if x.shape[:2] != (7, 7):
        raise ReferenceInputError(f"fc7 features need a 7x7 final map, got {x.shape[0]}x{x.shape[1]}")
    flat = x.transpose(2, 0, 1).reshape(-1)  # channels first, as torchvision flattens
    for name in ("classifier.0", "classifier.3"):
        flat = relu(w.get(f"{name}.weight") @ flat + w.get(f"{name}.bias"))
    return flat


def run(request):
    w = SafeTensors(request["weights"])
    architecture = request.get("architecture")
    if architecture not in ("resnet50", "vgg16"):
        raise ReferenceInputError(f"architecture must be resnet50 or vgg16, not {architecture!r}")
    features = request.get("features", "fc7")
    out = []
    for values in request.get("tensors", []):
        side = math.isqrt(len(values) // 3)
        if 3 * side * side != len(values):
            raise ReferenceInputError(f"a tensor of {len(values)} values is not 3 x H x H")
        x = np.asarray(values, dtype=np.float64).reshape(3, side, side).transpose(1, 2, 0)
        y = resnet50(x, w) if architecture == "resnet50" else vgg16(x, w, features)
        out.append(y.tolist())
    return {"features": out}


def main():
    try:
        request = json.load(sys.stdin)
        print(json.dumps(run(request)))
    except (ReferenceInputError, KeyError, ValueError) as err:
        print(f"torchvision_convnets_reference: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
