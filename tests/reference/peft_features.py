#!/usr/bin/env python3
"""Features of texts through a Hugging Face BERT model with a LoRA adapter
loaded by the Python `peft` package, or with top layers trained in full
loaded into it by PyTorch: the check that tlserve's exports are what peft
and PyTorch expect and that they apply them as tlserve does.

Protocol: one JSON object on stdin,
    {"model_dir": "...", "adapter_dir": "...", "texts": ["...", ...]}
or, for top layers, "layers_file" (tlserve's top_layers.safetensors) in
place of "adapter_dir"; and one JSON object on stdout,
    {"adapted": [[...], ...], "base": [[...], ...], "adapted_modules": N}
("replaced_tensors": N for top layers): mean pooling over the real tokens,
scaled to unit length (tlserve's features of a fine-tuned head), with the
adapter or layers and without them. Runs in the
virtualenv of scripts/setup-peft.sh (torch, transformers, peft), offline, in
float32 on the CPU.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def features(model, tokenizer, texts):
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(mean, dim=-1).tolist()


def with_layers(base, tokenizer, request):
    """The base model's features, then those with the stored layers loaded
    over its own; every stored tensor must name one of the model's."""
    from safetensors.torch import load_file

    plain = features(base, tokenizer, request["texts"])
    state = load_file(request["layers_file"])
    loaded = base.load_state_dict(state, strict=False)
    if loaded.unexpected_keys:
        raise SystemExit(f"tensors the model does not have: {loaded.unexpected_keys}")
    adapted = features(base, tokenizer, request["texts"])
    return {"adapted": adapted, "base": plain, "replaced_tensors": len(state)}


def main():
    request = json.load(sys.stdin)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    base = AutoModel.from_pretrained(request["model_dir"], dtype=torch.float32).eval()
    if "layers_file" in request:
        json.dump(with_layers(base, tokenizer, request), sys.stdout)
        return
    model = PeftModel.from_pretrained(base, request["adapter_dir"]).eval()
    adapted_modules = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    adapted = features(model, tokenizer, request["texts"])
    with model.disable_adapter():
        plain = features(model, tokenizer, request["texts"])
    json.dump({"adapted": adapted, "base": plain, "adapted_modules": adapted_modules}, sys.stdout)


if __name__ == "__main__":
    main()
