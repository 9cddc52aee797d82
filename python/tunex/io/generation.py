"""``generation_config.json`` for an exported model: stop where ``tunex chat`` stops.

A fine-tune trains each assistant reply to end with its chat template's end-of-turn token
(``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3 ...). A base model's own ``eos_token_id`` is
often another token (Qwen2 and SmolLM2 base models end documents with ``<|endoftext|>``), so
transformers' and vLLM's ``generate`` on the exported model would run past the end of the reply.
The exported ``generation_config.json`` lists every token ``tunex chat`` stops on: the base's
``eos_token_id`` (config.json and its own generation config), the tokenizer's eos token, and the
template's end-of-turn words that are single tokens. Its other settings (sampling defaults) are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "generation_config.json"


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return []


def end_of_turn_ids(tokenizer_dir: str | os.PathLike, template: str = "auto") -> list[int]:
    """Ids of the tokenizer's eos token and of ``template``'s single-token stop words.

    ``template="auto"`` uses the tokenizer's own chat template; without one only the eos token
    counts, and so with a tokenizer tunex cannot read. A built-in name that does not exist is an
    error (tunex.errors.DataError).
    """
    from tunex.templates import BUILTIN, get_template
    from tunex.tokenizer import load_tokenizer

    folder = Path(tokenizer_dir)
    if not (folder / "tokenizer.json").is_file():
        if template != "auto" and template not in BUILTIN:
            get_template(template)  # raises the unknown-template error
        return []
    try:
        tokenizer = load_tokenizer(folder)
    except Exception:
        if template != "auto":
            raise
        return []  # a tokenizer tunex cannot read: the config's eos stands alone
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if template == "auto" and not getattr(tokenizer, "chat_template", None):
        return ids
    for word in get_template(template, tokenizer).stop_words:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1 and tokenizer.decode(enc, skip_special_tokens=False) == word:
            ids.append(enc[0])
    return ids


def generation_config(
    model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None, template: str = "auto"
) -> dict:
    """The generation config an export of ``model_dir`` (fine-tuned with chat ``template``) gets."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    existing = model_dir / FILE
    out = json.loads(existing.read_text(encoding="utf-8")) if existing.is_file() else {}
    if not isinstance(out, dict):
        out = {}
    for key in ("bos_token_id", "pad_token_id"):
        if key not in out and config.get(key) is not None:
            out[key] = config[key]
    eos: list[int] = []
    found = (
        _ids(out.get("eos_token_id"))
        + _ids(config.get("eos_token_id"))
        + end_of_turn_ids(tokenizer_dir or model_dir, template)
    )
    for i in found:
        if i not in eos:
            eos.append(i)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def write_generation_config(
    out_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    template: str = "auto",
) -> Path:
    """Write :func:`generation_config` of ``model_dir`` to ``out_dir/generation_config.json``."""
    path = Path(out_dir) / FILE
    text = json.dumps(generation_config(model_dir, tokenizer_dir, template), indent=2, sort_keys=True) + "\n"
    tmp = path.with_name(f".{FILE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
