"""Reading data files: chunking, streaming JSON, folders, pkg:// paths, and every bad-input message."""

from __future__ import annotations

import json
import random

import pytest
from test_data_helpers import chatml_tokenizer, llama_tokenizer
from tunex.config import DataConfig
from tunex.data import build_dataset
from tunex.data import sources as S
from tunex.errors import DataError, FormatError


def cfg(path, **kw) -> DataConfig:
    kw.setdefault("template", "chatml")
    return DataConfig(path=str(path), **kw)


def alpaca_line(i: int) -> str:
    return json.dumps({"instruction": f"q{i}", "output": f"a{i}"})


@pytest.mark.parametrize("chunk_bytes", [1, 50, 333, 4096, 1 << 30])
def test_jsonl_chunks_cover_every_line_once_with_right_line_numbers(tmp_path, chunk_bytes):
    rng = random.Random(chunk_bytes)
    lines = [json.dumps({"i": i, "pad": "x" * rng.randint(0, 200)}) if i % 5 else "" for i in range(700)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines))  # no trailing newline on the last line
    digest, chunks = S.scan([f], chunk_bytes)
    got = [(line, rec["i"]) for c in chunks for line, rec in S.read_chunk(c)]
    assert got == [(i + 1, i) for i in range(700) if i % 5]
    assert chunks[0].start == 0 and chunks[-1].end == f.stat().st_size
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    assert digest == S.scan([f], 7)[0]  # the content hash does not depend on chunking


def test_json_array_is_streamed_element_by_element(tmp_path):
    records = [{"i": i, "text": "é" * i} for i in range(200)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    got = list(S._JsonStream(f, block=5))  # tiny reads: elements span many reads
    assert [v for _, v in got] == records
    assert got[0][0] == 2  # the line each element starts on
    f.write_text("\n".join(json.dumps(r) for r in records[:3]))  # JSON values one after another
    assert [r for _, r in S.read_chunk(S.scan([f])[1][0])] == records[:3]


def test_folders_pkg_paths_and_extensions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jsonl").write_text(alpaca_line(0))
    (tmp_path / "sub" / "a.json").write_text("[]")
    (tmp_path / "notes.md").write_text("ignored")
    assert S.list_files(str(tmp_path), "alpaca") == [tmp_path / "b.jsonl", tmp_path / "sub" / "a.json"]
    english = S.list_files("pkg://chatterbot_corpus/data/english", "chatterbot")
    assert english and all(p.suffix == ".yml" for p in english)
    with pytest.raises(FileNotFoundError, match="Python package 'nopkg_xyz' is not installed"):
        S.resolve_path("pkg://nopkg_xyz/data")
    with pytest.raises(DataError, match="format 'alpaca' reads .jsonl, .json files, not .md"):
        S.list_files(str(tmp_path / "notes.md"), "alpaca")
    with pytest.raises(DataError, match="no .yml, .yaml files in this folder for format 'chatterbot'"):
        S.list_files(str(tmp_path), "chatterbot")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        S.list_files(str(tmp_path / "missing.jsonl"), "alpaca")


def test_txt_files_are_pretraining_documents_one_per_line(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("first line\n\n  \nsecond line\r\n")
    ds = build_dataset(
        cfg(f, format="pretrain", pack_to_max_length=False), llama_tokenizer(), seed=0, cache_dir=tmp_path / "c"
    )
    assert ds.stats["records"] == 2 and len(ds) == 2
    assert llama_tokenizer().decode(ds[1]["input_ids"].tolist()) == "second line</s>"


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"instruction": "q", "output": "a"}] * 3).save_to_disk(str(tmp_path / "hf"))
    ds = build_dataset(cfg(tmp_path / "hf", format="alpaca"), chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c")
    assert ds.stats["records"] == 3 and ds.stats["samples"] == 3


# ---- bad input: each class of mistake names where and what ------------------------------------------


def build(tmp_path, name: str, content: str | bytes, **kw):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return build_dataset(cfg(f, **kw), chatml_tokenizer(), seed=0, cache_dir=tmp_path / "cache")


def test_malformed_json_line_names_file_line_and_problem(tmp_path):
    with pytest.raises(FormatError) as err:
        build(tmp_path, "d.jsonl", alpaca_line(0) + "\n\n" + '{"instruction": "q", "output": }\n')
    assert str(err.value) == f"{tmp_path / 'd.jsonl'}, line 3: not valid JSON: Expecting value at column 32"


def test_malformed_json_array_names_line(tmp_path):
    with pytest.raises(FormatError, match=r"d.json, line 3: not valid JSON: Expecting ',' delimiter at column 23"):
        build(tmp_path, "d.json", '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]')
    with pytest.raises(FormatError, match=r"d.json, line 1: not valid JSON: the file ends inside the top-level array"):
        build(tmp_path, "d.json", '[{"instruction": "q", "output": "a"}, ')


def test_missing_field_names_file_record_and_field(tmp_path):
    with pytest.raises(DataError) as err:
        build(tmp_path, "d.jsonl", alpaca_line(0) + "\n" + json.dumps({"instruction": "q"}) + "\n")
    assert str(err.value) == (f"{tmp_path / 'd.jsonl'}, line 2: missing field 'output' (fields present: instruction)")
    with pytest.raises(DataError) as err:
        build(tmp_path, "d.json", json.dumps([json.loads(alpaca_line(0)), {"output": "a"}]))
    assert str(err.value) == (
        f"{tmp_path / 'd.json'}, line 1, record 1: missing field 'instruction' (fields present: output)"
    )


def test_template_rejection_names_the_record(tmp_path):
    bad = [
        {"role": "user", "content": "q"},
        {"role": "system", "content": "late"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(DataError, match=r"d.jsonl, line 2: message 1 is a system message"):
        build(tmp_path, "d.jsonl", json.dumps(bad[:1] + bad[2:]) + "\n" + json.dumps(bad) + "\n", format="openai")


def test_empty_dataset_after_filtering_reports_counts(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": "q"}]})] * 3
    with pytest.raises(DataError) as err:
        build(tmp_path, "d.jsonl", "\n".join(lines), format="openai")
    assert "no sample left to train on" in str(err.value)
    assert "3 records read, 3 dropped without a target" in str(err.value)


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    first = (alpaca_line(0) + "\n").encode()
    with pytest.raises(FormatError) as err:
        build(tmp_path, "d.jsonl", first + b'{"instruction": "\xff", "output": "a"}\n')
    assert f"{tmp_path / 'd.jsonl'}, line 2: invalid UTF-8 at byte offset {len(first) + 17}" in str(err.value)
    with pytest.raises(FormatError, match=r"d.json: invalid UTF-8 at byte offset 18 "):
        build(tmp_path, "d.json", b'[{"instruction": "\xc3(", "output": "a"}]')
    with pytest.raises(FormatError, match=r"c.yml: invalid UTF-8 at byte offset 19"):
        build(tmp_path, "c.yml", b"conversations:\n- - \xff\n  - a\n", format="chatterbot")


def test_bad_yaml_and_wrong_shape(tmp_path):
    with pytest.raises(FormatError, match=r"c.yml, line 3: not valid YAML: did not find expected"):
        build(tmp_path, "c.yml", "conversations:\n- - [unclosed\n", format="chatterbot")
    with pytest.raises(DataError, match="expected a chatterbot-corpus file with a top-level 'conversations' list"):
        build(tmp_path, "c.yml", "categories: [x]\n", format="chatterbot")


def test_unknown_template_lists_valid_ones(tmp_path):
    with pytest.raises(DataError, match="unknown chat template 'nope'; expected 'auto' or one of: .*chatml"):
        build(tmp_path, "d.jsonl", alpaca_line(0), template="nope")
    tok = chatml_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template.*name a built-in template instead"):
        build_dataset(cfg(tmp_path / "d.jsonl", template="auto"), tok, seed=0, cache_dir=tmp_path / "c2")


def test_minified_json_array_keeps_a_bounded_buffer_and_exact_columns(tmp_path):
    records = [{"instruction": f"q{i}", "output": "a" * (i % 50)} for i in range(2000)]
    f = tmp_path / "d.json"
    text = json.dumps(records)  # one long line
    f.write_text(text)
    stream = S._JsonStream(f, block=256)
    seen = []

    class Spy:  # records how much text each decode is handed
        def raw_decode(self, s, idx):
            seen.append(len(s))
            return json.JSONDecoder().raw_decode(s, idx)

    stream.decoder = Spy()
    assert [value for _, value in stream] == records
    assert len(text) > 100_000 and max(seen) < 2_000  # never the whole file
    bad = text[:-1] + ', {"instruction": "x" "output": "y"}]'
    f.write_text(bad)
    with pytest.raises(FormatError) as err:
        list(S._JsonStream(f, block=256))
    column = bad.index('"output": "y"') + 1
    assert str(err.value).endswith(f"line 1: not valid JSON: Expecting ',' delimiter at column {column}")
