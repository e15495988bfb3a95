#!/usr/bin/env python3
"""Independent float64 reference for a GGUF Llama-architecture decoder.

The Rust server is checked against this script, so it deliberately shares no
code with it, with candle or with llama.cpp: the GGUF reader and the
dequantizers, the byte-level BPE tokenizer and the decoder forward pass are
all written here from scratch with numpy, the standard library and the
`regex` package (for the Unicode classes \\p{L} and \\p{N} that Python's `re`
lacks), and everything is computed in float64 so that the reference's own
rounding error is negligible next to the server's float32 arithmetic. The
quantized weights are expanded exactly (an F16 scale times a small integer,
plus an F16 offset, is exact in float64), so the reference computes with the
very values the file encodes.

Two choices keep it independent of the usual GGUF code path:

* GGUF stores the rows of attn_q and attn_k permuted so that llama.cpp can
  rotate adjacent pairs (x[2i], x[2i+1]) of each head. This script undoes the
  permutation, back to the Hugging Face checkpoint layout, and applies Hugging
  Face's rotate_half RoPE, which rotates the pairs (x[i], x[i + d/2]) by the
  same angles. Both give the same rotated vectors up to one fixed reordering
  of each head's components, the same for queries and keys, so every
  attention score q.k, and with it the whole model, is the same; only the
  arithmetic differs.
* The tokenizer follows Hugging Face's tokenizer for SmolLM2 (the
  tokenizer.json of the original checkpoint): added tokens matched literally
  in the raw text, then pre_tokenizer Sequence[Digits(individual_digits=true),
  ByteLevel(add_prefix_space=false, use_regex=true)], no normalizer, byte-level
  BPE merges by rank, no BOS. That is also what llama.cpp does for
  tokenizer.ggml.pre "smollm" (its regex list {"\\p{N}", GPT-2's split}).
  On texts with accents, CJK, emoji, odd whitespace, digits in several
  scripts and literal special tokens it gives the same ids as the tokenizers
  library set up that way.

Protocol: one JSON object on stdin,
    {"model_file": "....gguf",
     "texts": ["...", ...]  or  "token_ids": [[...], ...],
     "append_eos": false, "max_tokens": 512,
     "outputs": ["hidden", "last", "mean", "weighted_mean"],
     "tokenize_only": false}
with exactly one of texts and token_ids; the keys after those are optional.
append_eos (texts only) appends the EOS id after the text's tokens, for
last-token pooling. max_tokens truncates on the right, counting the EOS,
which is kept (the text's ids are cut to max_tokens - 1 first), as Hugging
Face truncates before adding special tokens; token_ids are only truncated.
outputs defaults to the three pooled vectors. One JSON object on stdout,
    {"token_ids": [[...], ...], "hidden": [[[...], ...], ...],
     "last": [[...], ...], "mean": [[...], ...], "weighted_mean": [[...], ...]}
with token_ids and the requested outputs only. hidden holds the final-normed
(output_norm) hidden state of every token; last is the last token's, mean the
plain average, weighted_mean SGPT's position-weighted average (token i,
counted from 1, has weight i / (1 + 2 + ... + n)). Nothing is L2-normalized.
With "tokenize_only": true the weights are not decoded and only token_ids is
returned. Each sequence is computed on its own, never padded into a batch.
Errors go to stderr with a non-zero exit status.

By hand: `llama_reference.py --demo [--model-file F]` prints the token ids and
the first pooled values of a few texts, and the tied LM head's top next-token
guesses after a prompt.
"""

import argparse
import json
import math
import os
import struct
import sys
from pathlib import Path

# The matrices here are small, so BLAS threads mostly fight each other (and a
# concurrent cargo build) for the CPU; one thread is several times faster on a
# busy machine and makes the output bit-for-bit repeatable. Must be set before
# numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import regex  # noqa: E402

DEFAULT_MODEL_FILE = (
    Path(__file__).resolve().parents[2]
    / "models"
    / "SmolLM2-135M-Instruct"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
OUTPUTS = ("hidden", "last", "mean", "weighted_mean")
DEFAULT_OUTPUTS = ("last", "mean", "weighted_mean")


class ReferenceInputError(Exception):
    """A problem with the input or the model file, reported without a traceback."""


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------

# Metadata value types: code -> struct format of a scalar (8 = string and
# 9 = array are handled apart).
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# The same scalar types as numpy dtypes, to read a numeric array in one go.
GGUF_ARRAY_DTYPES = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}


def f16_to_f64(raw):
    """Little-endian IEEE half-precision bytes (uint8 [..., 2]) -> float64, exactly."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float64)


def dequantize_f32(blocks):
    return blocks.view("<f4").astype(np.float64)


def dequantize_f16(blocks):
    return blocks.view("<f2").astype(np.float64)


def unpack_nibbles(packed):
    """Q4 quants (uint8 [blocks, 16]) -> float64 [blocks, 32]: the low nibbles
    are elements 0..15 of the block and the high nibbles 16..31."""
    q = np.empty((len(packed), 32), dtype=np.float64)
    np.bitwise_and(packed, 0x0F, out=q[:, :16], casting="unsafe")
    np.right_shift(packed, 4, out=q[:, 16:], casting="unsafe")
    return q


# The block decoders work in place on one float64 array: the weights are
# ~10^8 values, and every temporary of that size costs time and memory.


def dequantize_q8_0(blocks):
    # Block of 32: F16 scale d, then 32 int8 quants; x = d * q.
    x = blocks[:, 2:34].view(np.int8).astype(np.float64)
    x *= f16_to_f64(blocks[:, 0:2])[:, None]
    return x


def dequantize_q4_0(blocks):
    # Block of 32: F16 scale d, then 16 bytes of nibbles; x = d * (q - 8).
    x = unpack_nibbles(blocks[:, 2:18])
    x -= 8.0
    x *= f16_to_f64(blocks[:, 0:2])[:, None]
    return x


def dequantize_q4_1(blocks):
    # Block of 32: F16 scale d, F16 minimum m, then 16 bytes of nibbles;
    # x = d * q + m.
    x = unpack_nibbles(blocks[:, 4:20])
    x *= f16_to_f64(blocks[:, 0:2])[:, None]
    x += f16_to_f64(blocks[:, 2:4])[:, None]
    return x


# ggml type code -> (name, values per block, bytes per block, dequantizer).
# Only types whose exact decoding is simple enough to check by eye.
GGML_TYPES = {
    0: ("F32", 1, 4, dequantize_f32),
    1: ("F16", 1, 2, dequantize_f16),
    2: ("Q4_0", 32, 18, dequantize_q4_0),
    3: ("Q4_1", 32, 20, dequantize_q4_1),
    8: ("Q8_0", 32, 34, dequantize_q8_0),
}


class GgufFile:
    """Reads the metadata and tensors of a GGUF (version 2 or 3) file.

    Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count; the
    metadata as (string key, u32 type, value); then per tensor a string name,
    u32 dimension count, u64 dimensions (fastest-varying first, so a PyTorch
    [out, in] weight is listed as [in, out]), u32 ggml type and a u64 offset
    into the data section, which starts at the next multiple of
    general.alignment (default 32) after the last tensor entry. Strings are
    a u64 byte length then UTF-8 bytes.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.data = self.path.read_bytes()
        if self.data[:4] != b"GGUF":
            raise ReferenceInputError(f"{path}: not a GGUF file (magic {self.data[:4]!r})")
        self.pos = 4
        try:
            (version,) = self.read("<I")
            if version not in (2, 3):
                raise ReferenceInputError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
            tensor_count, kv_count = self.read("<QQ")
            self.metadata = {}
            for _ in range(kv_count):
                key = self.read_string()
                (value_type,) = self.read("<I")
                self.metadata[key] = self.read_value(value_type)
            self.tensors = {}
            for _ in range(tensor_count):
                name = self.read_string()
                (n_dims,) = self.read("<I")
                dims = self.read("<" + "Q" * n_dims)
                ggml_type, offset = self.read("<IQ")
                self.tensors[name] = (dims, ggml_type, offset)
        except struct.error as err:
            raise ReferenceInputError(f"{path}: truncated GGUF header: {err}") from err
        alignment = self.metadata.get("general.alignment", 32)
        self.data_start = -(-self.pos // alignment) * alignment

    def read(self, fmt):
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def read_string(self):
        (length,) = self.read("<Q")
        raw = self.data[self.pos : self.pos + length]
        if len(raw) != length:
            raise ReferenceInputError(f"{self.path}: truncated string in GGUF header")
        self.pos += length
        return raw.decode("utf-8")

    def read_value(self, value_type):
        if value_type == GGUF_STRING:
            return self.read_string()
        if value_type == GGUF_ARRAY:
            element_type, count = self.read("<IQ")
            if element_type == GGUF_STRING:
                return [self.read_string() for _ in range(count)]
            if element_type == GGUF_ARRAY:
                return [self.read_value(self.read("<I")[0]) for _ in range(count)]
            if element_type not in GGUF_ARRAY_DTYPES:
                raise ReferenceInputError(f"{self.path}: unknown GGUF array element type {element_type}")
            dtype = np.dtype(GGUF_ARRAY_DTYPES[element_type])
            array = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return array.astype(bool).tolist() if element_type == 7 else array.tolist()
        if value_type not in GGUF_SCALARS:
            raise ReferenceInputError(f"{self.path}: unknown GGUF value type {value_type}")
        (value,) = self.read(GGUF_SCALARS[value_type])
        return value

    def meta(self, key, default=None):
        if key not in self.metadata:
            if default is None:
                raise ReferenceInputError(f"{self.path}: metadata key {key!r} missing")
            return default
        return self.metadata[key]

    def tensor(self, name, rows=None):
        """The named tensor as a float64 array in PyTorch order ([out, in] for a
        weight); rows, if given, selects rows of a 2-D tensor before decoding."""
        if name not in self.tensors:
            raise ReferenceInputError(f"{self.path}: no tensor named {name!r}")
        dims, ggml_type, offset = self.tensors[name]
        if ggml_type not in GGML_TYPES:
            supported = ", ".join(t[0] for t in GGML_TYPES.values())
            raise ReferenceInputError(
                f"{self.path}: tensor {name!r} has ggml type {ggml_type}; only {supported} are supported"
            )
        type_name, block_values, block_bytes, dequantize = GGML_TYPES[ggml_type]
        shape = tuple(reversed(dims))
        row_len = shape[-1]
        if row_len % block_values:
            raise ReferenceInputError(f"{self.path}: tensor {name!r} rows of {row_len} do not fill {type_name} blocks")
        n_rows = math.prod(shape[:-1])
        row_bytes = row_len // block_values * block_bytes
        begin = self.data_start + offset
        if begin + n_rows * row_bytes > len(self.data):
            raise ReferenceInputError(f"{self.path}: tensor {name!r} runs past the end of the file")
        raw = np.frombuffer(self.data, dtype=np.uint8, count=n_rows * row_bytes, offset=begin)
        raw = raw.reshape(n_rows, row_bytes)
        if rows is not None:
            raw = raw[np.asarray(rows)]
            shape = (len(raw), row_len)
        values = dequantize(raw.reshape(-1, block_bytes))
        return values.reshape(shape)


# ---------------------------------------------------------------------------
# Tokenizer (byte-level BPE)
# ---------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space,
    0x7F-0xA0, 0xAD) take the code points 256, 257, ... in byte order, so the
    space byte 0x20 becomes 'Ġ' (U+0120) and the newline 0x0A 'Ċ' (U+010A).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# GPT-2's pre-tokenizer split, as the tokenizers library writes it. The final
# bare \s+ catches the one case no other branch takes (a whitespace character
# other than a space, directly before a non-space, as in "\tb"); llama.cpp's
# list leaves that branch out but then keeps unmatched text as a piece of its
# own, which comes to the same thing.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# Digits(individual_digits=true): every character of category N* (Nd, Nl, No,
# as Rust's char::is_numeric) is a piece of its own.
DIGIT = regex.compile(r"(\p{N})")

# tokenizer.ggml.pre -> whether digits are split off one by one before
# GPT-2's split. Other pre-tokenizers use different expressions and would
# need their own code.
PRE_TOKENIZERS = {"smollm": True, "gpt2": False}

# tokenizer.ggml.token_type values that the text can name literally.
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


class ByteLevelBpeTokenizer:
    """The GGUF vocabulary's byte-level BPE, as Hugging Face's tokenizer for SmolLM2 runs it."""

    def __init__(self, gguf):
        model = gguf.meta("tokenizer.ggml.model")
        if model != "gpt2":
            raise ReferenceInputError(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
        pre = gguf.meta("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ReferenceInputError(
                f"tokenizer.ggml.pre is {pre!r}; only {', '.join(map(repr, PRE_TOKENIZERS))} are supported"
            )
        self.split_digits = PRE_TOKENIZERS[pre]
        self.tokens = gguf.meta("tokenizer.ggml.tokens")
        token_types = gguf.meta("tokenizer.ggml.token_type")
        self.vocab = {}
        for i, token in enumerate(self.tokens):
            self.vocab.setdefault(token, i)
        # "left right" -> rank; a lower rank merges first. Byte-level symbols
        # never contain a literal space, so the space separates the two.
        self.ranks = {}
        for rank, merge in enumerate(gguf.meta("tokenizer.ggml.merges")):
            left, sep, right = merge.partition(" ")
            if not sep or " " in right:
                raise ReferenceInputError(f"malformed merge {merge!r}")
            self.ranks.setdefault((left, right), rank)
        self.unk_id = gguf.meta("tokenizer.ggml.unknown_token_id", -1)
        self.eos_id = gguf.meta("tokenizer.ggml.eos_token_id")
        if gguf.meta("tokenizer.ggml.add_bos_token", False):
            raise ReferenceInputError("tokenizer.ggml.add_bos_token is set; adding BOS is not supported")
        self.byte_chars = bytes_to_unicode()
        self.char_bytes = {c: b for b, c in self.byte_chars.items()}

        # Control and user-defined tokens written literally in the text are
        # matched in the raw text first and become their own ids, as Hugging
        # Face does with added tokens. Longest first, so that at any position
        # the longest token wins and a token that is a prefix of another
        # cannot shadow it.
        self.special = {}
        for i, (token, token_type) in enumerate(zip(self.tokens, token_types)):
            if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) and token:
                self.special.setdefault(token, i)
        alternatives = sorted(self.special, key=len, reverse=True)
        self.special_pattern = (
            regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")") if alternatives else None
        )
        self.cache = {}

    def pre_tokenize(self, text):
        """Splits text (free of special tokens) into the pieces BPE runs on."""
        parts = DIGIT.split(text) if self.split_digits else [text]
        pieces = []
        for part in parts:
            if part:
                found = GPT2_SPLIT.findall(part)
                # Every character is a letter, a number, whitespace or none of
                # those, so the split covers the text.
                assert "".join(found) == part
                pieces.extend(found)
        return pieces

    def bpe(self, piece):
        """Ids of one pre-token: its UTF-8 bytes as symbols, merged by rank."""
        if piece in self.cache:
            return self.cache[piece]
        symbols = [self.byte_chars[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            # The adjacent pair with the lowest rank is merged everywhere it
            # occurs, left to right, as in GPT-2's encoder. (Merging one
            # occurrence at a time, as the tokenizers library does, gives the
            # same result: a merge can only create pairs ranked after it.)
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(symbol, self.unk_id) for symbol in symbols]
        if any(i < 0 for i in ids):
            raise ReferenceInputError(f"no vocabulary entry for part of {piece!r} and no unknown token")
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        segments = self.special_pattern.split(text) if self.special_pattern else [text]
        ids = []
        # A split on a capturing group alternates text and matched tokens.
        for i, segment in enumerate(segments):
            if i % 2:
                ids.append(self.special[segment])
            else:
                for piece in self.pre_tokenize(segment):
                    ids.extend(self.bpe(piece))
        return ids

    def decode(self, ids):
        raw = bytearray()
        for i in ids:
            token = self.tokens[i]
            if token in self.special:
                raw.extend(token.encode("utf-8"))
            else:
                raw.extend(self.char_bytes.get(c, ord("?")) for c in token)
        return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Llama decoder
# ---------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def silu(x):
    # x * sigmoid(x); exp(-x) overflows to inf for x < -709, which gives the
    # correct limit -0.0, so the warning is silenced.
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def unpermute_rope_rows(weight, n_heads):
    """Undoes the GGUF converter's row permutation of attn_q / attn_k.

    Within each head of d rows, Hugging Face row j * d/2 + i (j = 0, 1;
    i < d/2) was stored as GGUF row 2 * i + j, so that the two halves that
    rotate_half pairs up became adjacent rows. Reading the head as [d/2, 2]
    and transposing it to [2, d/2] puts the rows back.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, in_features)
        .transpose(0, 2, 1, 3)
        .reshape(out_features, in_features)
    )


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Llama:
    def __init__(self, gguf):
        arch = gguf.meta("general.architecture")
        if arch != "llama":
            raise ReferenceInputError(f"general.architecture is {arch!r}; only 'llama' is supported")
        self.gguf = gguf
        self.num_layers = gguf.meta("llama.block_count")
        self.hidden = gguf.meta("llama.embedding_length")
        self.num_heads = gguf.meta("llama.attention.head_count")
        self.num_kv_heads = gguf.meta("llama.attention.head_count_kv", self.num_heads)
        self.head_dim = self.hidden // self.num_heads
        self.eps = gguf.meta("llama.attention.layer_norm_rms_epsilon")
        self.rope_theta = gguf.meta("llama.rope.freq_base", 10000.0)
        self.max_positions = gguf.meta("llama.context_length")
        rope_dims = gguf.meta("llama.rope.dimension_count", self.head_dim)
        if rope_dims != self.head_dim:
            raise ReferenceInputError(f"partial RoPE ({rope_dims} of {self.head_dim} dimensions) is not supported")
        scaling = gguf.metadata.get("llama.rope.scaling.type", "none")
        if scaling != "none":
            raise ReferenceInputError(f"RoPE scaling {scaling!r} is not supported")
        if self.hidden % self.num_heads or self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ReferenceInputError("inconsistent head counts")
        block_tensors = {
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
        }
        for name in gguf.tensors:
            if name.startswith("blk.") and name.split(".")[2] not in block_tensors:
                raise ReferenceInputError(f"unexpected tensor {name!r} (biases, MoE, ... are not supported)")

        self.output_norm = gguf.tensor("output_norm.weight")
        self.layers = [self.load_layer(f"blk.{i}.") for i in range(self.num_layers)]

        # Hugging Face's default RoPE: frequency theta^(-2i/d) for the pair
        # (i, i + d/2); the angles of every position are made once here.
        inv_freq = self.rope_theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.arange(self.max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        self.cos, self.sin = np.cos(angles), np.sin(angles)

    def linear(self, name, unpermute_heads=None):
        # [out, in], PyTorch's order once the GGUF dimensions are reversed; a
        # layer is x @ weight.T, which BLAS does as fast as with a transposed
        # copy.
        weight = self.gguf.tensor(name)
        if unpermute_heads is not None:
            weight = unpermute_rope_rows(weight, unpermute_heads)
        return weight

    def load_layer(self, p):
        return {
            "attn_norm": self.gguf.tensor(p + "attn_norm.weight"),
            "q": self.linear(p + "attn_q.weight", unpermute_heads=self.num_heads),
            "k": self.linear(p + "attn_k.weight", unpermute_heads=self.num_kv_heads),
            "v": self.linear(p + "attn_v.weight"),
            "o": self.linear(p + "attn_output.weight"),
            "ffn_norm": self.gguf.tensor(p + "ffn_norm.weight"),
            "gate": self.linear(p + "ffn_gate.weight"),
            "up": self.linear(p + "ffn_up.weight"),
            "down": self.linear(p + "ffn_down.weight"),
        }

    def embed(self, ids):
        # Only the rows needed are decoded: the table is the largest tensor.
        vocab = self.gguf.tensors["token_embd.weight"][0][1]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ReferenceInputError(f"token ids {bad[:5]} outside the vocabulary of {vocab}")
        return self.gguf.tensor("token_embd.weight", rows=ids)

    def forward(self, ids):
        """Final-normed hidden states [len(ids), hidden] of one unpadded sequence."""
        n = len(ids)
        if n == 0:
            raise ReferenceInputError("empty sequence: no token to compute")
        if n > self.max_positions:
            raise ReferenceInputError(f"sequence of {n} tokens exceeds the context of {self.max_positions}")
        x = self.embed(ids)
        cos, sin = self.cos[:n], self.sin[:n]
        # Position j may attend to positions <= j only.
        future = np.triu(np.ones((n, n), dtype=bool), k=1)
        for layer in self.layers:
            x = x + self.attention(rms_norm(x, layer["attn_norm"], self.eps), layer, cos, sin, future)
            h = rms_norm(x, layer["ffn_norm"], self.eps)
            x = x + (silu(h @ layer["gate"].T) * (h @ layer["up"].T)) @ layer["down"].T
        return rms_norm(x, self.output_norm, self.eps)

    def attention(self, h, layer, cos, sin, future):
        n = h.shape[0]
        d = self.head_dim

        def heads(weight, count):
            return (h @ weight.T).reshape(n, count, d).transpose(1, 0, 2)

        q = heads(layer["q"], self.num_heads)
        k = heads(layer["k"], self.num_kv_heads)
        v = heads(layer["v"], self.num_kv_heads)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Grouped-query attention: query head i reads KV head i // group.
        group = self.num_heads // self.num_kv_heads
        k = np.repeat(k, group, axis=0)
        v = np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores[:, future] = -np.inf
        context = (softmax(scores) @ v).transpose(1, 0, 2).reshape(n, self.num_heads * d)
        return context @ layer["o"].T


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

# Parsed files and decoded weights, kept for the life of the process so that
# several calls (the demo, a test importing this module) pay for them once.
_GGUF_CACHE, _TOKENIZER_CACHE, _MODEL_CACHE = {}, {}, {}


def load_gguf(path):
    key = str(Path(path).resolve())
    if key not in _GGUF_CACHE:
        _GGUF_CACHE[key] = GgufFile(path)
    return _GGUF_CACHE[key]


def load_tokenizer(path):
    key = str(Path(path).resolve())
    if key not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[key] = ByteLevelBpeTokenizer(load_gguf(path))
    return _TOKENIZER_CACHE[key]


def load_model(path):
    key = str(Path(path).resolve())
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = Llama(load_gguf(path))
    return _MODEL_CACHE[key]


def pool(hidden, outputs):
    """The requested outputs of one sequence's hidden states [n, hidden]."""
    n = hidden.shape[0]
    result = {}
    if "hidden" in outputs:
        result["hidden"] = hidden
    if "last" in outputs:
        result["last"] = hidden[-1]
    if "mean" in outputs:
        result["mean"] = hidden.mean(axis=0)
    if "weighted_mean" in outputs:
        # SGPT: token i (1-based) weighs i / (1 + 2 + ... + n).
        weights = np.arange(1, n + 1, dtype=np.float64)
        result["weighted_mean"] = (weights / weights.sum()) @ hidden
    return result


def token_sequences(model_file, texts=None, token_ids=None, append_eos=False, max_tokens=None):
    """The id sequences to run: texts tokenized (EOS appended if asked), or token_ids as given."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ReferenceInputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if token_ids is not None:
        return [list(ids[:max_tokens]) if max_tokens else list(ids) for ids in token_ids]
    tokenizer = load_tokenizer(model_file)
    sequences = []
    for text in texts:
        ids = tokenizer.encode(text)
        if max_tokens is not None:
            ids = ids[: max_tokens - 1] if append_eos else ids[:max_tokens]
        if append_eos:
            ids.append(tokenizer.eos_id)
        sequences.append(ids)
    return sequences


def run(model_file, sequences, outputs):
    """Returns, per sequence, a dict of the requested outputs."""
    model = load_model(model_file)
    return [pool(model.forward(ids), outputs) for ids in sequences]


def check_request(request):
    known = {"model_file", "texts", "token_ids", "append_eos", "max_tokens", "outputs", "tokenize_only"}
    unknown = set(request) - known
    if unknown:
        raise ReferenceInputError(f"unknown request keys: {sorted(unknown)}")
    if "model_file" not in request or not isinstance(request["model_file"], str):
        raise ReferenceInputError("request needs 'model_file' (a path)")
    if ("texts" in request) == ("token_ids" in request):
        raise ReferenceInputError("request needs exactly one of 'texts' and 'token_ids'")
    texts = request.get("texts")
    if texts is not None and (not isinstance(texts, list) or not all(isinstance(t, str) for t in texts)):
        raise ReferenceInputError("'texts' must be a list of strings")
    token_ids = request.get("token_ids")
    if token_ids is not None and (
        not isinstance(token_ids, list)
        or not all(
            isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            for ids in token_ids
        )
    ):
        raise ReferenceInputError("'token_ids' must be a list of lists of integers")
    for key in ("append_eos", "tokenize_only"):
        if not isinstance(request.get(key, False), bool):
            raise ReferenceInputError(f"'{key}' must be true or false")
    if request.get("append_eos") and token_ids is not None:
        raise ReferenceInputError("'append_eos' applies to 'texts' only")
    outputs = request.get("outputs", list(DEFAULT_OUTPUTS))
    if not isinstance(outputs, list) or not all(o in OUTPUTS for o in outputs):
        raise ReferenceInputError(f"'outputs' must be a list drawn from {list(OUTPUTS)}")


def run_protocol():
    try:
        request = json.load(sys.stdin)
    except json.JSONDecodeError as err:
        raise ReferenceInputError(f"stdin is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise ReferenceInputError("stdin must hold a JSON object")
    check_request(request)
    model_file = request["model_file"]
    sequences = token_sequences(
        model_file,
        texts=request.get("texts"),
        token_ids=request.get("token_ids"),
        append_eos=request.get("append_eos", False),
        max_tokens=request.get("max_tokens"),
    )
    response = {"token_ids": sequences}
    if not request.get("tokenize_only", False):
        outputs = request.get("outputs", list(DEFAULT_OUTPUTS))
        results = run(model_file, sequences, outputs)
        for name in OUTPUTS:
            if name in outputs:
                response[name] = [r[name].tolist() for r in results]
    # json writes floats with repr(), the shortest string that round-trips,
    # so no precision is lost on the way to the Rust test.
    json.dump(response, sys.stdout)
    sys.stdout.write("\n")


def run_demo(model_file):
    texts = [
        "Hello, world!",
        "Café crème brûlée à Paris 東京 🙂, 12345 and 3.14",
        "<|im_start|>user\nWhat's the capital of France?<|im_end|>",
    ]
    sequences = token_sequences(model_file, texts=texts, append_eos=True)
    results = run(model_file, sequences, ["last", "mean", "weighted_mean"])
    for text, ids, result in zip(texts, sequences, results):
        print(repr(text))
        print("  token ids:", ids)
        for name in ("last", "mean", "weighted_mean"):
            print(f"  {name}[:5]:", [round(x, 6) for x in result[name][:5].tolist()])

    # The output head is tied to the token embedding, so the last hidden
    # state scored against every embedding row predicts the next token: a
    # check of the whole stack that needs no other implementation.
    prompt = "The capital of France is"
    tokenizer = load_tokenizer(model_file)
    model = load_model(model_file)
    ids = tokenizer.encode(prompt)
    head_name = "output.weight" if "output.weight" in model.gguf.tensors else "token_embd.weight"
    logits = model.gguf.tensor(head_name) @ model.forward(ids)[-1]
    top = np.argsort(-logits)[:5]
    print(f"{prompt!r} -> next token, top 5:")
    for i in top:
        print(f"  {int(i):6d} {tokenizer.decode([int(i)])!r:16} logit {logits[i]:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="run a few built-in texts and print the results")
    parser.add_argument("--model-file", default=str(DEFAULT_MODEL_FILE), help="GGUF file for --demo")
    args = parser.parse_args()
    try:
        if args.demo:
            run_demo(args.model_file)
        else:
            run_protocol()
    except (ReferenceInputError, OSError, UnicodeError) as err:
        print(f"llama_reference: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
