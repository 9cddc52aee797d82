"""Tokenizers between GGUF metadata (``tokenizer.ggml.*``) and HF tokenizer.json files.

Byte-level BPE vocabularies (llama.cpp's ``gpt2`` tokenizer model: SmolLM2, Llama 3, Qwen2) in both
directions. llama.cpp names the pre-tokenizer by a ``pre`` key; each maps to the same split rules in
the `tokenizers` vocabulary (for ``smollm``: every digit alone, then GPT-2's pattern).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunex.errors import FormatError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def pre_tokenizer_for(pre: str) -> dict:
    """The tokenizer.json pre_tokenizer of a llama.cpp ``tokenizer.ggml.pre`` name."""
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, _byte_level(True)]}
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_SPLIT), _byte_level(False)]}
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return {"type": "Sequence", "pretokenizers": [_split(_QWEN2_SPLIT), _byte_level(False)]}
    return _byte_level(True)  # gpt2 / default


def pre_name_of(pre_tokenizer: dict | None) -> str:
    """The llama.cpp ``pre`` name for a tokenizer.json pre_tokenizer (inverse of pre_tokenizer_for)."""
    text = json.dumps(pre_tokenizer or {})
    if '"individual_digits": true' in text:
        return "smollm"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}|" in text:
        return "qwen2"
    return "gpt2"


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_files_from_gguf(reader, context_length: int | None = None) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json contents rebuilt from a GGUF reader's metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise FormatError(f"{reader.data.filename if hasattr(reader.data, 'filename') else 'GGUF'}: "
                          f"tokenizer model {model!r} is not supported; tunex rebuilds byte-level BPE "
                          "('gpt2') vocabularies only")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    merges = [m.split(" ", 1) for m in _field(reader, "tokenizer.ggml.merges", [])]
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] != CONTROL, "special": types[i] == CONTROL}
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if add_bos and bos else []) + \
        [{"Sequence": {"id": "A", "type_id": 0}}] + \
        ([{"SpecialToken": {"id": eos, "type_id": 0}}] if add_eos and eos else [])
    specials = {t: {"id": t, "ids": [tokens.index(t)], "tokens": [t]}
                for t, on in ((bos, add_bos), (eos, add_eos)) if on and t}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer_for(pre),
        "post_processor": {"type": "TemplateProcessing", "single": single,
                           "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": specials},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
              "bos_token": bos, "eos_token": eos, "unk_token": token("unknown"),
              "pad_token": token("padding"), "clean_up_tokenization_spaces": False,
              "model_max_length": context_length or 2048}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": {k: v for k, v in config.items()
                                                                       if v is not None}}


def add_tokenizer_to_gguf(writer, folder: Path) -> None:
    """Write the ``tokenizer.ggml.*`` metadata of an HF folder's byte-level BPE tokenizer."""
    from tunex.tokenizer import load_tokenizer

    file = folder / "tokenizer.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise FormatError(f"{file}: only byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) can be "
                          f"written to GGUF; this one is {model.get('type')!r} with decoder "
                          f"{(data.get('decoder') or {}).get('type')!r}")
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
        types[i] = NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name_of(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                        (writer.add_unk_token_id, tok.token_to_id(tok.unk_token)),
                        (writer.add_pad_token_id, tok.token_to_id(tok.pad_token))):
        if tid is not None:
            setter(tid)
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
