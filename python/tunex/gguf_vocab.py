"""Tokenizers between GGUF metadata (``tokenizer.ggml.*``) and HF tokenizer.json files.

Two kinds, both directions:

* byte-level BPE (llama.cpp's ``gpt2`` model: SmolLM2, Llama 3, Qwen2). llama.cpp names the
  pre-tokenizer by a ``pre`` key; each maps to the same split rules in `tokenizers` (for
  ``smollm``: every digit alone, then GPT-2's pattern);
* SentencePiece-style BPE (llama.cpp's ``llama`` model: Llama 2, Mistral, TinyLlama): ``▁`` for
  spaces, ``<0xNN>`` byte fallback. GGUF keeps a score per token instead of merges; the merges are
  rebuilt from the scores (each token's splits into two vocabulary tokens, best score first), the
  rule transformers' GGUF loader uses, and on export a merged token's score is minus its merge rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunex.errors import FormatError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def pre_tokenizer_for(pre: str) -> dict:
    """The tokenizer.json pre_tokenizer of a llama.cpp ``tokenizer.ggml.pre`` name."""
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)]}
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_SPLIT), _byte_level(False)]}
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return {"type": "Sequence", "pretokenizers": [_split(_QWEN2_SPLIT), _byte_level(False)]}
    return _byte_level(True)  # gpt-2 / default (and "gpt2", which older tunex exports wrote)


def pre_name_of(pre_tokenizer: dict | None) -> str:
    """The llama.cpp ``pre`` name for a tokenizer.json pre_tokenizer (inverse of pre_tokenizer_for).
    GPT-2's own split is ``gpt-2`` there: llama.cpp refuses a file whose ``pre`` it does not know."""
    text = json.dumps(pre_tokenizer or {})
    if '"individual_digits": true' in text:
        return "smollm"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}|" in text:
        return "qwen2"
    return "gpt-2"


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two vocabulary
    tokens, ordered by the token's score (best first), then by the lengths of the two parts."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[a, b] for a, b, _ in found]


def _spm_parts(unk: str | None) -> dict:
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model_options": {"unk_token": unk, "fuse_unk": True, "byte_fallback": True},
    }


def _byte_level_parts(pre: str) -> dict:
    return {
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_for(pre),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model_options": {"unk_token": None, "fuse_unk": False, "byte_fallback": False},
    }


def tokenizer_files_from_gguf(reader, context_length: int | None = None) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json contents rebuilt from a GGUF reader's metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise FormatError(
            f"GGUF tokenizer model {model!r} is not supported; tunex rebuilds byte-level "
            "BPE ('gpt2') and SentencePiece BPE ('llama') vocabularies"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if model == "gpt2":
        merges = [m.split(" ", 1) for m in _field(reader, "tokenizer.ggml.merges", [])]
    else:
        merges = merges_from_scores(tokens, list(_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))))
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk = token("bos"), token("eos"), token("unknown")
    special = {i for i, t in enumerate(types) if t == CONTROL or (t == UNKNOWN and model == "llama")}
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": i in special,
        }
        for i, t in enumerate(tokens)
        if i in special or types[i] == USER_DEFINED
    ]
    parts = _spm_parts(unk) if model == "llama" else _byte_level_parts(pre)
    single = (
        ([{"SpecialToken": {"id": bos, "type_id": 0}}] if add_bos and bos else [])
        + [{"Sequence": {"id": "A", "type_id": 0}}]
        + ([{"SpecialToken": {"id": eos, "type_id": 0}}] if add_eos and eos else [])
    )
    specials = {
        t: {"id": t, "ids": [tokens.index(t)], "tokens": [t]} for t, on in ((bos, add_bos), (eos, add_eos)) if on and t
    }
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": parts["normalizer"],
        "pre_tokenizer": parts["pre_tokenizer"],
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": specials,
        },
        "decoder": parts["decoder"],
        "model": {
            "type": "BPE",
            "dropout": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "ignore_merges": False,
            **parts["model_options"],
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": token("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length or 2048,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": {k: v for k, v in config.items() if v is not None},
    }


def _scores_from_merges(tokens: list[str], merges: list[list[str]]) -> list[float]:
    """Minus the merge rank for merged tokens (best first); unmergeable tokens rank below all."""
    rank = {}
    for i, (a, b) in enumerate(merges):
        rank.setdefault(a + b, i)
    floor = len(merges)
    return [-float(rank[t]) if t in rank else -float(floor + i) for i, t in enumerate(tokens)]


def add_tokenizer_to_gguf(writer, folder: Path) -> None:
    """Write the ``tokenizer.ggml.*`` metadata of an HF folder's BPE tokenizer (byte-level or
    SentencePiece-style with byte fallback)."""
    from tunex.tokenizer import load_tokenizer

    file = folder / "tokenizer.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    byte_level = "ByteLevel" in json.dumps(data.get("decoder"))
    spm = bool(model.get("byte_fallback")) and not byte_level
    if model.get("type") != "BPE" or not (byte_level or spm):
        raise FormatError(
            f"{file}: only BPE tokenizers, byte-level (SmolLM2, Llama 3, Qwen2) or with byte "
            f"fallback (Llama 2, Mistral), can be written to GGUF; this one is "
            f"{model.get('type')!r} with decoder {(data.get('decoder') or {}).get('type')!r}"
        )
    tok = load_tokenizer(folder)
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in data.get("added_tokens", [])}
    for content, a in added.items():
        vocab.setdefault(content, a["id"])
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(t)
        if spm and t == model.get("unk_token"):
            types[i] = UNKNOWN
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
        else:
            types[i] = NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else pre_name_of(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(_scores_from_merges(tokens, merges))
    else:
        writer.add_token_merges([" ".join(m) for m in merges])
    for setter, tid in (
        (writer.add_bos_token_id, tok.bos_token_id),
        (writer.add_eos_token_id, tok.eos_token_id),
        (writer.add_unk_token_id, tok.token_to_id(tok.unk_token)),
        (writer.add_pad_token_id, tok.token_to_id(tok.pad_token)),
    ):
        if tid is not None:
            setter(tid)
    post = json.dumps(data.get("post_processor"))
    writer.add_add_bos_token(bool(tok.bos_token) and f'"{tok.bos_token}"' in post)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
