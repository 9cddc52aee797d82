"""Tokenizers made in the tests for the data pipeline tests (no tests here).

``char_tokenizer`` maps every character to its own token (special tokens stay whole), so a label
mask can be read back as text: the runs of target and non-target tokens decode to exact strings.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel
from tunex.tokenizer import Tokenizer

CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t", "é", "ü"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA_SPECIALS = ["<s>", "</s>"]
# the shape of SmolLM2-Instruct's own template (ChatML with a default system prompt)
CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def backend(specials: list[str]) -> Backend:
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Backend(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    return tok


def chatml_tokenizer() -> Tokenizer:
    """eos <|im_end|>, no bos, a jinja chat template (like SmolLM2-Instruct)."""
    return Tokenizer(
        backend(CHATML_SPECIALS), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, None, CHATML_JINJA
    )


def llama_tokenizer() -> Tokenizer:
    """bos <s>, eos </s>, no chat template."""
    return Tokenizer(backend(LLAMA_SPECIALS), {"bos_token": "<s>", "eos_token": "</s>"}, None, None)


def save_tokenizer(tok: Tokenizer, folder: Path) -> Path:
    """Write ``tok`` as an HF tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(folder / "tokenizer.json"))
    config = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(tok, k)}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def runs(tok: Tokenizer, ids, mask) -> list[tuple[str, bool]]:
    """Consecutive tokens grouped by target flag, each group decoded: an exact picture of a mask."""
    out: list[tuple[str, bool]] = []
    for i, m in zip(list(ids), list(mask)):
        piece = tok.backend.id_to_token(int(i))
        if out and out[-1][1] == bool(m):
            out[-1] = (out[-1][0] + piece, bool(m))
        else:
            out.append((piece, bool(m)))
    return out
