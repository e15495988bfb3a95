#!/usr/bin/env python3
"""Loads an adapter that `tlserve bench-finetune --export-peft DIR` wrote with
the Python peft package on the same base model, computes the adapted features
of the test texts (mean pooling over real tokens, unit length, as tlserve),
and compares them with tlserve's (DIR/features.jsonl): prints the lowest and
mean cosine and exits non-zero below 0.9999.

Usage: peft_check.py DIR MODEL_DIR TEST_TSV   (a venv with torch, transformers, peft)
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer


def main():
    export, model_dir, test = sys.argv[1:4]
    texts = [line.rstrip("\n").split("\t", 1)[1] for line in open(test, encoding="utf-8") if line.strip()]
    ours = np.array([json.loads(line) for line in open(os.path.join(export, "features.jsonl"))])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, export).eval()
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    theirs = features(model, tokenizer, texts)
    with model.disable_adapter():
        base = features(model, tokenizer, texts)
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    cos = cosines(theirs, ours)
    print(f"peft ({adapted} adapted modules) against tlserve over {len(cos)} texts: "
          f"cosine lowest {cos.min():.7f}, mean {cos.mean():.7f} (needed >= 0.9999)")
    moved = cosines(base, ours)
    print(f"the base model without adapters against tlserve: cosine lowest {moved.min():.5f}, "
          f"mean {moved.mean():.5f} (what the adapters changed)")
    sys.exit(0 if cos.min() >= 0.9999 else 1)


def features(model, tokenizer, texts):
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), 32):
            batch = tokenizer(texts[start:start + 32], padding=True, truncation=True,
                              max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1)
            rows.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(rows).astype(np.float64)


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


if __name__ == "__main__":
    main()
