#!/usr/bin/env python3
"""Independent float64 reference for all-MiniLM-L6-v2 sentence embeddings.

The Rust server is checked against this script, so it deliberately shares no
code with it or with the usual Python stack: the safetensors reader, the BERT
WordPiece tokenizer and the transformer forward pass are all written here from
scratch with only numpy and the standard library, and everything is computed
in float64 so that the reference's own rounding error is negligible next to
the server's float32 arithmetic.

Protocol: one JSON object on stdin,
    {"model_dir": "...", "sentences": ["...", ...],
     "max_seq_length": 256, "pooling": "mean" | "cls", "normalize": true}
(all keys but model_dir and sentences are optional; max_seq_length defaults to
the value in the model's sentence_bert_config.json), and one JSON object on
stdout,
    {"token_ids": [[...], ...], "embeddings": [[...], ...]}.
Errors go to stderr with a non-zero exit status.

Tokenization follows the HF tokenizers library that sentence-transformers
runs (BertNormalizer, BertPreTokenizer, WordPiece), including its few
departures from the original BERT code, noted where they occur. Exhaustive
per-code-point comparison finds it identical except for ~500 characters added
to Unicode after version 8.0, which the library's older tables do not know.

By hand: `minilm_reference.py --demo [--model-dir DIR]` prints the token ids
and the first embedding values of a few sentences.
"""

import argparse
import json
import math
import os
import re
import struct
import sys
import unicodedata
from pathlib import Path

# The matrices here are small, so BLAS threads mostly fight each other (and a
# concurrent cargo build) for the CPU; one thread is several times faster on a
# busy machine and makes the output bit-for-bit repeatable. Must be set before
# numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2"
DEFAULT_MAX_SEQ_LENGTH = 256


class ReferenceInputError(Exception):
    """A problem with the input or the model files, reported without a traceback."""


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

# Only the dtypes numpy represents exactly; anything else (BF16, F8, ...) would
# need a conversion that could itself be wrong, so it is refused.
SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


class SafeTensors:
    """Reads tensors from a .safetensors file.

    Layout: u64 little-endian header size N, N bytes of JSON mapping each
    tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets are
    relative to the end of the header), then the raw little-endian data.
    """

    def __init__(self, path):
        data = Path(path).read_bytes()
        if len(data) < 8:
            raise ReferenceInputError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", data[:8])
        if 8 + header_len > len(data):
            raise ReferenceInputError(f"{path}: header length {header_len} exceeds file size")
        try:
            header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReferenceInputError(f"{path}: unreadable safetensors header: {err}") from err
        header.pop("__metadata__", None)
        self.path = path
        self.header = header
        self.data = memoryview(data)[8 + header_len :]

    def names(self):
        return self.header.keys()

    def get(self, name):
        """Returns the named tensor as a float64 array."""
        try:
            info = self.header[name]
        except KeyError:
            raise ReferenceInputError(f"{self.path}: no tensor named {name!r}") from None
        dtype = info["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ReferenceInputError(
                f"{self.path}: tensor {name!r} has dtype {dtype}; "
                f"only {', '.join(SAFETENSORS_DTYPES)} are supported"
            )
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        expected = math.prod(shape) * np_dtype.itemsize
        if end - begin != expected or end > len(self.data):
            raise ReferenceInputError(
                f"{self.path}: tensor {name!r} spans bytes [{begin}, {end}) "
                f"but shape {list(shape)} of {dtype} needs {expected}"
            )
        array = np.frombuffer(self.data[begin:end], dtype=np_dtype).reshape(shape)
        return array.astype(np.float64)


# ---------------------------------------------------------------------------
# Tokenizer (BERT BasicTokenizer + WordPiece, uncased)
# ---------------------------------------------------------------------------


# Where the original BERT code and the HF tokenizers library (which
# sentence-transformers runs) disagree on rare characters, the library wins:
# it is the behaviour the server has to reproduce.


def is_whitespace(char):
    # Unicode White_Space as the library uses it: Zs plus the line and
    # paragraph separators U+2028/U+2029 (BERT's own code only took Zs). The
    # other White_Space characters are controls and are dropped before this.
    return char in " \t\n\r" or char.isspace()


def is_control(char):
    # Tab and newlines are categorised Cc but BERT treats them as whitespace.
    if char in "\t\n\r":
        return False
    # Unassigned code points (Cn) are kept as ordinary characters, as the
    # library does, rather than dropped as BERT's category "C*" test would.
    return unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs")


def is_punctuation(char):
    # ASCII symbols such as $ + < = > ^ ` | ~ are not Unicode punctuation (P*)
    # but BERT splits them off all the same.
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def is_cjk(cp):
    # The CJK Unified Ideographs blocks (not Hangul, Hiragana or Katakana,
    # which are written with spaces and tokenized like other scripts). The
    # library starts Extension E at 0x2B920 where BERT has 0x2B820, leaving
    # 256 rare ideographs unsplit; that is copied here.
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B920 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT tokenization as done by HF's BertTokenizer for an uncased vocab."""

    def __init__(self, tokenizer_json_path):
        with open(tokenizer_json_path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type") != "WordPiece":
            raise ReferenceInputError(f"{tokenizer_json_path}: model type is {model.get('type')!r}, not WordPiece")
        self.vocab = model["vocab"]
        self.prefix = model.get("continuing_subword_prefix", "##")
        self.max_chars_per_word = model.get("max_input_chars_per_word", 100)
        self.unk_id = self.vocab[model.get("unk_token", "[UNK]")]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

        # Added tokens ([CLS], [SEP], [MASK], ...) written literally in the
        # input are matched in the raw text, before any normalisation, and
        # become their own ids, exactly as the HF tokenizer does it.
        self.added = {}
        for token in spec.get("added_tokens", []):
            if token.get("normalized") or token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
                raise ReferenceInputError(f"{tokenizer_json_path}: unsupported options on added token {token['content']!r}")
            self.added[token["content"]] = token["id"]
        # Longest first so that one token that is a prefix of another cannot shadow it.
        alternatives = sorted(self.added, key=len, reverse=True)
        self.added_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def basic_tokens(self, text):
        """Normalises text and splits it into words and punctuation marks."""
        chars = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD or is_control(char):
                continue
            if is_whitespace(char):
                chars.append(" ")
            elif is_cjk(cp):
                # Chinese is written without spaces; each ideograph is a word.
                chars.extend((" ", char, " "))
            else:
                chars.append(char)
        # Lowercase one character at a time: str.lower() on a whole string
        # applies the Greek final-sigma rule (Σ -> ς at a word end), which the
        # HF tokenizers library, used by sentence-transformers, does not.
        text = "".join(char.lower() for char in chars)
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")

        tokens = []
        for word in text.split(" "):
            current = []
            for char in word:
                if is_punctuation(char):
                    if current:
                        tokens.append("".join(current))
                        current = []
                    tokens.append(char)
                else:
                    current.append(char)
            if current:
                tokens.append("".join(current))
        return tokens

    def wordpiece(self, word):
        """Greedy longest-match-first split of one word into vocabulary ids."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end]
                if start > 0:
                    piece = self.prefix + piece
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                # Some suffix of the word matches nothing: the whole word is unknown.
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text, max_seq_length):
        """[CLS] pieces [SEP], truncated to max_seq_length ids in total."""
        segments = self.added_pattern.split(text) if self.added_pattern else [text]
        ids = []
        # re.split with a capturing group alternates text and matched tokens.
        for i, segment in enumerate(segments):
            if i % 2:
                ids.append(self.added[segment])
            else:
                for word in self.basic_tokens(segment):
                    ids.extend(self.wordpiece(word))
        return [self.cls_id] + ids[: max_seq_length - 2] + [self.sep_id]


# ---------------------------------------------------------------------------
# BERT encoder
# ---------------------------------------------------------------------------


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):
    # Exact GELU (config hidden_act "gelu"), not the tanh approximation. numpy
    # has no erf, and math.erf element by element is slow but plainly correct.
    scaled = (x / math.sqrt(2.0)).ravel().tolist()
    erf = np.fromiter(map(math.erf, scaled), dtype=np.float64, count=len(scaled))
    return 0.5 * x * (1.0 + erf.reshape(x.shape))


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class Bert:
    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        with open(model_dir / "config.json", encoding="utf-8") as f:
            config = json.load(f)
        if config.get("hidden_act", "gelu") != "gelu":
            raise ReferenceInputError(f"unsupported hidden_act {config['hidden_act']!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ReferenceInputError(f"unsupported position_embedding_type {config['position_embedding_type']!r}")
        self.num_heads = config["num_attention_heads"]
        self.num_layers = config["num_hidden_layers"]
        self.eps = config["layer_norm_eps"]
        self.max_positions = config["max_position_embeddings"]

        weights = SafeTensors(model_dir / "model.safetensors")
        # Checkpoints saved from BertForXxx carry a "bert." prefix; BertModel ones do not.
        prefix = "bert." if any(n.startswith("bert.") for n in weights.names()) else ""
        self.w = lambda name: weights.get(prefix + name)

        self.word_embeddings = self.w("embeddings.word_embeddings.weight")
        self.position_embeddings = self.w("embeddings.position_embeddings.weight")
        self.token_type_embedding = self.w("embeddings.token_type_embeddings.weight")[0]
        self.embeddings_ln = self.layer_norm_params("embeddings.LayerNorm")
        self.layers = [self.load_layer(f"encoder.layer.{i}.") for i in range(self.num_layers)]

    def layer_norm_params(self, name):
        return self.w(name + ".weight"), self.w(name + ".bias")

    def linear_params(self, name):
        # Stored as [out, in], as torch.nn.Linear does; transposed once here.
        return self.w(name + ".weight").T, self.w(name + ".bias")

    def load_layer(self, p):
        return {
            "query": self.linear_params(p + "attention.self.query"),
            "key": self.linear_params(p + "attention.self.key"),
            "value": self.linear_params(p + "attention.self.value"),
            "attention_out": self.linear_params(p + "attention.output.dense"),
            "attention_ln": self.layer_norm_params(p + "attention.output.LayerNorm"),
            "intermediate": self.linear_params(p + "intermediate.dense"),
            "out": self.linear_params(p + "output.dense"),
            "out_ln": self.layer_norm_params(p + "output.LayerNorm"),
        }

    def forward(self, ids):
        """Hidden states [len(ids), hidden] of one unpadded sequence (token type 0)."""
        n = len(ids)
        if n > self.max_positions:
            raise ReferenceInputError(f"sequence of {n} tokens exceeds {self.max_positions} positions")
        x = self.word_embeddings[ids] + self.position_embeddings[:n] + self.token_type_embedding
        x = layer_norm(x, *self.embeddings_ln, self.eps)
        for layer in self.layers:
            x = self.encoder_layer(x, layer)
        return x

    def encoder_layer(self, x, layer):
        n, hidden = x.shape
        head_dim = hidden // self.num_heads

        def heads(params):
            weight, bias = params
            return (x @ weight + bias).reshape(n, self.num_heads, head_dim).transpose(1, 0, 2)

        q, k, v = heads(layer["query"]), heads(layer["key"]), heads(layer["value"])
        # No attention mask: the sequence is never padded, so every key is real.
        probs = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(head_dim))
        context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)

        weight, bias = layer["attention_out"]
        x = layer_norm(context @ weight + bias + x, *layer["attention_ln"], self.eps)

        weight, bias = layer["intermediate"]
        inner = gelu(x @ weight + bias)
        weight, bias = layer["out"]
        return layer_norm(inner @ weight + bias + x, *layer["out_ln"], self.eps)


# ---------------------------------------------------------------------------
# Sentence embeddings
# ---------------------------------------------------------------------------


def pool(hidden, pooling):
    if pooling == "mean":
        # Every token of an unpadded sequence, [CLS] and [SEP] included, is in
        # the attention mask that sentence-transformers averages over.
        return hidden.mean(axis=0)
    return hidden[0]


def l2_normalize(v):
    # Same floor as torch.nn.functional.normalize, so a zero vector stays zero.
    return v / max(np.linalg.norm(v), 1e-12)


def default_max_seq_length(model_dir):
    path = Path(model_dir) / "sentence_bert_config.json"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH)
    return DEFAULT_MAX_SEQ_LENGTH


def embed(model_dir, sentences, max_seq_length=None, pooling="mean", normalize=True):
    """Returns (token_ids, embeddings) for each sentence."""
    if max_seq_length is None:
        max_seq_length = default_max_seq_length(model_dir)
    # Room for [CLS] and [SEP] is the least that makes a well-formed sequence.
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 2:
        raise ReferenceInputError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")
    if pooling not in ("mean", "cls"):
        raise ReferenceInputError(f"unknown pooling {pooling!r}; expected 'mean' or 'cls'")
    tokenizer = WordPieceTokenizer(Path(model_dir) / "tokenizer.json")
    model = Bert(model_dir)
    all_ids, embeddings = [], []
    for sentence in sentences:
        ids = tokenizer.encode(sentence, max_seq_length)
        vector = pool(model.forward(ids), pooling)
        if normalize:
            vector = l2_normalize(vector)
        all_ids.append(ids)
        embeddings.append(vector)
    return all_ids, embeddings


def run_protocol():
    try:
        request = json.load(sys.stdin)
    except json.JSONDecodeError as err:
        raise ReferenceInputError(f"stdin is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise ReferenceInputError("stdin must hold a JSON object")
    unknown = set(request) - {"model_dir", "sentences", "max_seq_length", "pooling", "normalize"}
    if unknown:
        raise ReferenceInputError(f"unknown request keys: {sorted(unknown)}")
    if "model_dir" not in request or "sentences" not in request:
        raise ReferenceInputError("request needs 'model_dir' and 'sentences'")
    sentences = request["sentences"]
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise ReferenceInputError("'sentences' must be a list of strings")
    normalize = request.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ReferenceInputError("'normalize' must be true or false")
    ids, embeddings = embed(
        request["model_dir"],
        sentences,
        max_seq_length=request.get("max_seq_length"),
        pooling=request.get("pooling", "mean"),
        normalize=normalize,
    )
    # json writes floats with repr(), the shortest string that round-trips,
    # so no precision is lost on the way to the Rust test.
    json.dump({"token_ids": ids, "embeddings": [e.tolist() for e in embeddings]}, sys.stdout)
    sys.stdout.write("\n")


def run_demo(model_dir):
    sentences = ["Hello, world!", "Café crème brûlée à Paris 東京"]
    ids, embeddings = embed(model_dir, sentences)
    for sentence, sentence_ids, vector in zip(sentences, ids, embeddings):
        print(sentence)
        print("  token ids:", sentence_ids)
        print("  embedding[:5]:", [round(x, 6) for x in vector[:5].tolist()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="embed a few built-in sentences and print them")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="model folder for --demo")
    args = parser.parse_args()
    try:
        if args.demo:
            run_demo(args.model_dir)
        else:
            run_protocol()
    except (ReferenceInputError, OSError) as err:
        print(f"minilm_reference: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
