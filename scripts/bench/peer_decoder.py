#!/usr/bin/env python3
"""Peer side of the decoder-throughput benchmark: transformers' LlamaModel on PyTorch CPU.

Loads the GGUF file tlserve serves (SmolLM2-135M-Instruct by default) with
transformers, which dequantizes every tensor to float (the `gguf` package
reads the file), and its tokenizer from the same file's metadata; then
measures sentences per second at each batch size. Prints one JSON object per
line in the format tlserve's `bench-embed` subcommand prints, so that
scripts/bench-decoder.sh can put them side by side:

  {"engine": "torch", "backbone": NAME, "batch_size": B, "sentences": N,
   "seconds": T, "sentences_per_sec": N/T, "threads": n, "dtype": D,
   "tokens": real tokens run, "padded_tokens": tokens run with the padding,
   "versions": {...}}

What a text goes through, as in tlserve's llama backbone:
- Tokens: the file's byte-level BPE. No beginning-of-sequence token (the
  file's tokenizer.ggml.add_bos_token is false, and transformers adds none),
  and the end-of-sequence token (tokenizer.ggml.eos_token_id, <|im_end|> = 2
  here) appended to every text, by the same post-processor template tlserve
  builds ("$A <eos>"). For tokenizer.ggml.pre = "smollm" the pre-tokenizer
  splits digits one by one before the byte-level split, as tlserve and
  llama.cpp do (transformers' GGUF converter only does the byte-level split;
  with this vocabulary, which has no multi-digit tokens, both give the same
  ids). Texts longer than --max-sequence-length are truncated, EOS kept.
- Forward: LlamaModel (the decoder without its language-model head; its
  output is the final RMS-normed hidden states), causal attention, no KV
  cache, under torch.inference_mode. A batch is padded on the right to its
  longest text, with an attention mask; under causal attention the padding
  after a text cannot change its rows.
- Features: the mean of the final hidden states over the text's real tokens
  (EOS included), in float32 whatever --dtype, then L2-normalised as tlserve
  does by default (normalize = true; --no-normalize for the raw mean).

Measurement, as tlserve's: per batch size, one untimed batch (or
--warm-passes whole passes), then batches of exactly B sentences taken in
corpus order, wrapping around, until at least --min-seconds have passed and
the whole corpus has been seen once, but never more than 50 passes. Each
timed batch is tokenized, run and pooled: tokenization counts, as it does for
tlserve. The corpus is not sorted by length: a service receives batches as
they come, so each batch pads to its own longest text (tlserve's native
engine packs the texts of a batch instead, without padding).

--sample-out PATH writes, before timing, the first --sample-lines corpus
lines with the token ids used and their feature vectors (JSON), and prints
them shortened to stderr, to compare with tlserve's (cosine).
--embeddings-out PATH writes every corpus line's feature vector, one JSON
array per line, in corpus order (as `tlserve bench-embed --embeddings-out`).

Run it with the interpreter of the peer virtualenv (scripts/bench-decoder.sh
--setup-peer); nothing here is a dependency of tlserve.
"""

import argparse
import glob
import json
import math
import os
import platform
import sys
import time

from bench_args import positive_int, positive_int_list

# Set before transformers is imported: it reads these at import time, and the
# benchmark must fail rather than reach for a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# transformers' progress bar over the GGUF tensors would fill the log.
os.environ.setdefault("TQDM_DISABLE", "1")

# Same cap as tlserve's bench-embed (src/bench/mod.rs, MAX_PASSES).
MAX_PASSES = 50


def fail(message):
    print(f"peer_decoder: error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="folder with the .gguf file")
    p.add_argument("--gguf-file",
                   help="the file's name in --model-dir (default: the folder's only .gguf)")
    p.add_argument("--name", help="printed as \"backbone\" (default: the folder's name)")
    p.add_argument("--corpus", required=True, help="text file, one sentence per line")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32],
                   help="comma-separated (default: 1,8,32)")
    p.add_argument("--min-seconds", type=float, default=5.0,
                   help="measure each batch size for at least this long (default: 5)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="torch intra-op threads (default: number of cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's float type after dequantization (default: float32)")
    p.add_argument("--warm-passes", type=int, default=0,
                   help="untimed passes over the corpus at each batch size before timing "
                        "it (default 0: one untimed batch)")
    p.add_argument("--max-sequence-length", type=positive_int,
                   help="most tokens per text, EOS included (default: the model's context)")
    p.add_argument("--no-normalize", action="store_true",
                   help="return the mean-pooled vectors as they are, not L2-normalised")
    p.add_argument("--sample-out", help="write the first --sample-lines lines' token ids "
                                        "and vectors here (JSON) before timing")
    p.add_argument("--sample-lines", type=positive_int, default=3,
                   help="corpus lines in --sample-out (default: 3)")
    p.add_argument("--embeddings-out", help="write every corpus line's vector here "
                                            "(JSON lines, corpus order) before timing")
    return p.parse_args()


def read_corpus(path):
    # Lines trimmed and empty ones dropped, as tlserve's bench-embed reads it.
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        fail(f"corpus {path} has no non-empty lines")
    return lines


def gguf_path(model_dir, name):
    if name:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            fail(f"no {name} in {model_dir}")
        return path
    found = sorted(glob.glob(os.path.join(model_dir, "*.gguf")))
    if len(found) != 1:
        fail(f"{model_dir} holds {len(found)} .gguf files; name one with --gguf-file")
    return found[0]


def gguf_metadata(path, keys):
    """The scalar and string metadata `keys` of a GGUF file (None when absent)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {key: fields[key].contents() if key in fields else None for key in keys}


class Decoder:
    """Tokenizer, LlamaModel and pooling: texts in, feature vectors out."""

    def __init__(self, path, dtype_name, max_len, normalize):
        import torch
        import transformers
        from tokenizers import pre_tokenizers, processors
        from transformers import AutoModel, AutoTokenizer

        folder, name = os.path.split(path)
        meta = gguf_metadata(path, ["tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                                    "tokenizer.ggml.eos_token_id", "llama.context_length"])
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        backend = tokenizer.backend_tokenizer
        if meta["tokenizer.ggml.pre"] == "smollm":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                         use_regex=True),
            ])
        eos_id = meta["tokenizer.ggml.eos_token_id"]
        if eos_id is None:
            fail(f"{path} has no tokenizer.ggml.eos_token_id")
        eos = tokenizer.convert_ids_to_tokens(int(eos_id))
        # The only special token of every text, at its end; replaces whatever
        # post-processor the converter built (BOS and EOS flags included).
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", special_tokens=[(eos, int(eos_id))])
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = eos
        self.context = int(meta["llama.context_length"] or 0) or None
        self.max_len = max_len or self.context
        self.tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        self.check_tokens()

        dtype = getattr(torch, dtype_name)
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = AutoModel.from_pretrained(folder, gguf_file=name, **{dtype_key: dtype})
        if type(model).__name__ != "LlamaModel":
            fail(f"{path} loads as {type(model).__name__}, not LlamaModel")
        self.model = model.eval()
        self.hidden = model.config.hidden_size
        self.normalize = normalize

    def token_ids(self, text):
        return self.tokenizer(text, truncation=self.max_len is not None,
                              max_length=self.max_len)["input_ids"]

    def check_tokens(self):
        # No BOS, exactly one EOS, at the end: what tlserve feeds its decoder.
        ids = self.token_ids("a b")
        if ids[-1] != self.eos_id or ids.count(self.eos_id) != 1 or \
                (self.tokenizer.bos_token_id is not None and ids[0] == self.tokenizer.bos_token_id):
            fail(f"the tokenizer gives {ids} for 'a b': not text + EOS ({self.eos_id})")

    def tokenize(self, texts):
        return self.tokenizer(texts, padding=True, truncation=self.max_len is not None,
                              max_length=self.max_len, return_tensors="pt")

    def mean(self, texts):
        """The mean of each text's final hidden states over its real tokens, float32."""
        import torch

        batch = self.tokenize(texts)
        hidden = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            use_cache=False).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
        return (hidden.to(torch.float32) * mask).sum(dim=1) / mask.sum(dim=1)

    def __call__(self, texts):
        import torch

        pooled = self.mean(texts)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def versions():
    import gguf
    import numpy
    import tokenizers
    import torch
    import transformers

    try:
        from importlib.metadata import version
        gguf_version = version("gguf")
    except Exception:  # an unusual install without metadata
        gguf_version = getattr(gguf, "__version__", "unknown")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": gguf_version,
        "numpy": numpy.__version__,
    }


def batch_of(corpus, offset, size):
    return [corpus[(offset + i) % len(corpus)] for i in range(size)]


def check_output(vectors, rows, width, normalized):
    import torch

    if tuple(vectors.shape) != (rows, width):
        fail(f"forward returned shape {list(vectors.shape)}, expected [{rows}, {width}]")
    if not bool(torch.isfinite(vectors).all()):
        fail("forward returned non-finite features")
    if normalized:
        norms = vectors.to(torch.float64).norm(dim=-1).tolist()
        if not all(math.isfinite(n) and abs(n - 1.0) < 1e-3 for n in norms):
            fail(f"features are not unit-normalised (norms {norms[:4]}...)")


def token_counts(lengths, count, size):
    """Real and padded tokens of the first `count` sentences in size-B batches."""
    real = padded = 0
    for start in range(0, count, size):
        batch = [lengths[(start + i) % len(lengths)] for i in range(size)]
        real += sum(batch)
        padded += size * max(batch)
    return real, padded


def measure(decoder, corpus, size, min_seconds, warm_passes):
    # Untimed: the first call at a new shape pays for allocations that a
    # long-running service pays once.
    start = 0
    while start < max(1, warm_passes * len(corpus)):
        decoder(batch_of(corpus, start, size))
        start += size
    count = 0
    started = time.perf_counter()
    while ((time.perf_counter() - started < min_seconds or count < len(corpus))
           and count < MAX_PASSES * len(corpus)):
        decoder(batch_of(corpus, count, size))
        count += size
    return count, time.perf_counter() - started


def write_sample(decoder, corpus, args, path):
    import torch

    texts = corpus[:args.sample_lines]
    means = decoder.mean(texts)
    vectors = torch.nn.functional.normalize(means, dim=-1) if decoder.normalize else means
    sentences = []
    for text, mean, vector in zip(texts, means, vectors):
        ids = decoder.token_ids(text)
        sentences.append({
            "text": text,
            "token_ids": ids,
            "tokens": decoder.tokenizer.convert_ids_to_tokens(ids),
            "embedding": [round(v, 7) for v in vector.tolist()],
            # Before normalisation, to compare magnitudes too.
            "mean_l2_norm": round(float(mean.norm()), 6),
        })
    sample = {
        "model": os.path.basename(args.gguf_path),
        "dtype": args.dtype,
        "pooling": "mean",
        "normalized": decoder.normalize,
        "bos_added": False,
        "gguf_add_bos_token": decoder.add_bos,
        "eos_appended": decoder.eos_id,
        "versions": versions(),
        "sentences": sentences,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(sample, f, indent=1)
        f.write("\n")
    for s in sentences:
        head = ", ".join(f"{v:.5f}" for v in s["embedding"][:6])
        print(f"peer_decoder: sample {s['text'][:50]!r}: {len(s['token_ids'])} tokens "
              f"{s['token_ids'][:4]}...{s['token_ids'][-2:]}, mean norm "
              f"{s['mean_l2_norm']:.4f}, [{head}, ...]", file=sys.stderr)
    unit = torch.nn.functional.normalize(means, dim=-1)
    if len(texts) > 1:
        print("peer_decoder: sample cosines, first to the others: "
              f"{[round(v, 4) for v in (unit[1:] @ unit[0]).tolist()]}", file=sys.stderr)


def write_embeddings(decoder, corpus, path):
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(corpus), 32):
            for vector in decoder(corpus[start:start + 32]).tolist():
                f.write(json.dumps(vector) + "\n")


def main():
    args = parse_args()
    corpus = read_corpus(args.corpus)
    args.gguf_path = gguf_path(args.model_dir, args.gguf_file)
    name = args.name or os.path.basename(os.path.normpath(args.model_dir))

    import torch

    torch.set_num_threads(args.threads)
    loaded = time.perf_counter()
    decoder = Decoder(args.gguf_path, args.dtype, args.max_sequence_length,
                      not args.no_normalize)
    print(f"peer_decoder: {name} loaded ({args.dtype}) in "
          f"{time.perf_counter() - loaded:.1f} s", file=sys.stderr)
    if decoder.max_len and decoder.context and decoder.max_len > decoder.context:
        fail(f"--max-sequence-length {decoder.max_len} exceeds the model's context "
             f"of {decoder.context} tokens")
    info = versions()
    threads = torch.get_num_threads()

    with torch.inference_mode():
        warm = corpus[:8]
        check_output(decoder(warm), len(warm), decoder.hidden, decoder.normalize)
        if args.sample_out:
            write_sample(decoder, corpus, args, args.sample_out)
        if args.embeddings_out:
            write_embeddings(decoder, corpus, args.embeddings_out)
        lengths = [len(decoder.token_ids(text)) for text in corpus]
        print(f"peer_decoder: corpus: {len(corpus)} sentences, "
              f"{sum(lengths) / len(lengths):.1f} tokens each on average (EOS included), "
              f"{min(lengths)} to {max(lengths)}", file=sys.stderr)
        for size in args.batch_sizes:
            sentences, seconds = measure(decoder, corpus, size, args.min_seconds,
                                         args.warm_passes)
            tokens, padded = token_counts(lengths, sentences, size)
            print(json.dumps({
                "engine": "torch",
                "backbone": name,
                "batch_size": size,
                "sentences": sentences,
                "seconds": round(seconds, 6),
                "sentences_per_sec": round(sentences / seconds, 3),
                "threads": threads,
                "dtype": args.dtype,
                "tokens": tokens,
                "padded_tokens": padded,
                "versions": info,
            }), flush=True)


if __name__ == "__main__":
    main()
