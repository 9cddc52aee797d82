"""Tokenizers from HF folders: tokenizer.json through the `tokenizers` library.

Special tokens and the chat template come from tokenizer_config.json (and special_tokens_map.json,
chat_template.jinja when present), the way transformers' fast tokenizers read them, so ids and
rendered prompts agree with transformers token for token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tunex.errors import FormatError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object at the top level")
    return data


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    if not template:
        extra = _read_json(folder / "chat_template.json").get("chat_template")
        return extra if isinstance(extra, str) else None
    return template


class Tokenizer:
    """A fast tokenizer plus the special tokens and chat template of its folder.

    Attributes:
        path: the folder it was loaded from.
        bos_token, eos_token, pad_token, unk_token: special token strings or None.
        chat_template: the model's jinja chat template, or None.
    """

    def __init__(
        self, backend: Any, config: dict | None = None, path: Path | None = None, chat_template: str | None = None
    ):
        self.backend = backend
        self.path = path
        config = config or {}
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name)))
        self.chat_template = chat_template
        self.model_max_length = config.get("model_max_length")

    # ---- ids of special tokens --------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_token_id

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n)}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- encode / decode --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab={self.vocab_size}, eos={self.eos_token!r})"


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # a multi-byte character is still being spelled out
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of an HF folder (or anything :func:`tunex.models.resolve_model_path` takes)."""
    from tokenizers import Tokenizer as Backend

    from tunex.models.hub import resolve_model_path

    folder = Path(path).expanduser()
    if not (folder / "tokenizer.json").is_file():  # a tokenizer-only folder needs no config.json
        folder = resolve_model_path(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json; tunex reads fast tokenizers only (convert a slow "
            "tokenizer once with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
        )
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise FormatError(f"{file}: cannot be read as a tokenizers file: {exc}") from exc
    config = _read_json(folder / "special_tokens_map.json")
    config.update(_read_json(folder / "tokenizer_config.json"))
    return Tokenizer(backend, config, folder, _chat_template(folder, config))
