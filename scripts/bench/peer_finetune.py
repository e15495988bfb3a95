#!/usr/bin/env python3
"""Reference run of tlserve's fine-tuning in PyTorch (+ peft for LoRA), same
recipe: a linear head fitted on the frozen features (L-BFGS, softmax
regression with a small L2 penalty), then LoRA adapters (rank, alpha, query
and value of the top layers; learning rate 5e-4) or the top layers in full
(`--method top_layers`, every weight of the top 2 layers by default; learning
rate 5e-5) and the head trained together with AdamW (separate learning
rates, weight decay 0.01, 10% linear warm-up then linear decay, batches of
16), 10% of the training texts held out, the epoch with the best held-out
loss kept (the frozen head the first candidate). Features: mean pooling over
real tokens, unit length. Prints one JSON line with the test accuracy and the
seconds per epoch.

Usage: peer_finetune.py MODEL_DIR TRAIN_TSV TEST_TSV [--method lora|top_layers]
       [--layers N] [--rank R] [--alpha A] [--epochs E] [--threads T] [--seed S]
"""

import argparse
import copy
import json
import os
import random
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer


def read(path):
    pairs = [line.rstrip("\n").split("\t", 1) for line in open(path, encoding="utf-8") if line.strip()]
    return [p[1] for p in pairs], [p[0] for p in pairs]


def pooled(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("train")
    p.add_argument("test")
    p.add_argument("--method", choices=["lora", "top_layers"], default="lora")
    p.add_argument("--layers", type=int, default=None, help="default: 6 (LoRA), 2 (top layers)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    texts, labels = read(a.train)
    test_texts, test_labels = read(a.test)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(l) for l in labels])
    y_test = torch.tensor([classes.index(l) for l in test_labels])
    order = list(range(len(texts)))
    random.Random(a.seed).shuffle(order)
    held = order[:round(len(order) * 0.1)]
    train = order[len(held):]
    tok = AutoTokenizer.from_pretrained(a.model)
    enc = lambda rows, pool: tok([pool[i] for i in rows], padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
    base = AutoModel.from_pretrained(a.model, dtype=torch.float32)
    n_layers = base.config.num_hidden_layers
    if a.method == "lora":
        layers = a.layers or n_layers
        model = get_peft_model(base, LoraConfig(
            r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=["query", "value"],
            layers_to_transform=list(range(n_layers - layers, n_layers))))
        trained = [p for n, p in model.named_parameters() if "lora_" in n]
        backbone_lr = 5e-4
    else:
        layers = a.layers or min(2, n_layers)
        model = base
        for parameter in model.parameters():
            parameter.requires_grad = False
        trained = [p for layer in model.encoder.layer[n_layers - layers:] for p in layer.parameters()]
        for parameter in trained:
            parameter.requires_grad = True
        backbone_lr = 5e-5

    def features(rows, pool):
        model.eval()
        with torch.no_grad():
            return torch.cat([pooled(model, enc(rows[i:i + 64], pool)) for i in range(0, len(rows), 64)])

    # Linear probe: softmax regression on the frozen features, L-BFGS.
    started = time.perf_counter()
    head = torch.nn.Linear(base.config.hidden_size, len(classes))
    x = features(train, texts)
    lbfgs = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    def closure():
        lbfgs.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y[train]) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    lbfgs.step(closure)
    probe_seconds = time.perf_counter() - started

    def held_loss():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(head(features(held, texts)), y[held]).item()

    opt = torch.optim.AdamW([{"params": trained, "lr": backbone_lr}, {"params": head.parameters(), "lr": 1e-3}],
                            weight_decay=0.01)
    steps = a.epochs * ((len(train) + 15) // 16)
    warmup = max(1, int(steps * 0.1 + 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s + 1 <= warmup else max(0.0, (steps - s) / (steps - warmup + 1)))
    best = (held_loss(), copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict()), 0)
    epoch_seconds = []
    for epoch in range(1, a.epochs + 1):
        started = time.perf_counter()
        model.train()
        rows = train[:]
        random.Random(a.seed + epoch).shuffle(rows)
        for i in range(0, len(rows), 16):
            batch = rows[i:i + 16]
            loss = torch.nn.functional.cross_entropy(head(pooled(model, enc(batch, texts))), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        epoch_seconds.append(time.perf_counter() - started)
        loss = held_loss()
        if loss < best[0]:
            best = (loss, copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict()), epoch)
    model.load_state_dict(best[1])
    head.load_state_dict(best[2])
    with torch.no_grad():
        predicted = head(features(list(range(len(test_texts))), test_texts)).argmax(1)
    print(json.dumps({
        "engine": "pytorch+peft" if a.method == "lora" else "pytorch", "method": a.method,
        "layers": layers, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "test_accuracy": (predicted == y_test).float().mean().item(), "kept_epoch": best[3],
        "probe_seconds": probe_seconds, "epoch_seconds": epoch_seconds,
        "train_examples": len(texts), "test_examples": len(test_texts),
    }))


if __name__ == "__main__":
    main()
