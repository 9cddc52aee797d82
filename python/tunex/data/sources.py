"""Where records come from: files and folders, read as a stream of (location, record) pairs.

Supported inputs: JSON Lines (``.jsonl``), JSON (``.json``: a top-level array, or JSON values one
after another), plain text (``.txt``: one document per non-empty line, pretraining only), YAML
chatterbot-corpus files (``.yml``/``.yaml``), and folders written by ``datasets``' ``save_to_disk``
(read through ``datasets`` when it is installed). A path may be ``pkg://PACKAGE/sub/path``: a path
inside an installed Python package, found without importing it.

Nothing here loads a whole file into a Python list: JSON Lines and text files are split into byte
ranges (:class:`Chunk`) at line boundaries so that worker processes can read them independently,
and a JSON array is decoded one element at a time.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunex.errors import DataError, FormatError
from tunex.pkgpath import local_path

# Extensions each format reads; files with other extensions inside a folder are skipped.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "pretrain": (".jsonl", ".json", ".txt"),
    "chatterbot": (".yml", ".yaml"),
    "chatterbot_pairs": (".yml", ".yaml"),
}
JSON_SUFFIXES = (".jsonl", ".json")
CHUNK_BYTES = 4 << 20  # a worker's unit of work: big enough to batch, small enough to balance
_HASH_BLOCK = 1 << 20


def suffixes_for(fmt: str) -> tuple[str, ...]:
    return SUFFIXES.get(fmt, JSON_SUFFIXES)


def resolve_path(path: str) -> Path:
    """``pkg://PACKAGE/sub/path`` -> the path inside the installed package; other paths unchanged."""
    return local_path(path)


def is_hf_dataset_dir(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def list_files(paths: str | Sequence[str], fmt: str) -> list[Path]:
    """Every data file under ``paths`` for format ``fmt``, in a stable (sorted) order.

    Raises:
        FileNotFoundError: a path does not exist.
        DataError: a named file has the wrong extension, or a folder holds no data file.
    """
    wanted = suffixes_for(fmt)
    found: list[Path] = []
    for given in [paths] if isinstance(paths, str) else list(paths):
        p = resolve_path(given)
        if p.is_file():
            if p.suffix.lower() not in wanted:
                hint = "; .txt files need format = 'pretrain'" if p.suffix == ".txt" else ""
                raise DataError(
                    f"{p}: format {fmt!r} reads {', '.join(wanted)} files, "
                    f"not {p.suffix or 'a file without extension'}{hint}"
                )
            found.append(p)
        elif p.is_dir():
            found.extend(_walk(p, wanted, fmt))
        else:
            raise FileNotFoundError(f"data.path {given!r}: no such file or folder ({p})")
    return found


def _walk(folder: Path, wanted: tuple[str, ...], fmt: str) -> list[Path]:
    if is_hf_dataset_dir(folder):
        return [folder]
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(root)
        if here != folder and is_hf_dataset_dir(here):
            files.append(here)
            dirs[:] = []
            continue
        files.extend(here / n for n in sorted(names) if Path(n).suffix.lower() in wanted and not n.startswith("."))
    if not files:
        raise DataError(f"{folder}: no {', '.join(wanted)} files in this folder for format {fmt!r}")
    return files


# ---- chunks: units of reading work -------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A byte range [start, end) of one file starting at line ``first_line`` (1-based).

    Whole-file kinds (json, yaml, hf) always cover the entire file.
    """

    file: str
    kind: str  # "jsonl" | "txt" | "json" | "yaml" | "hf"
    start: int = 0
    end: int = -1
    first_line: int = 1


def kind_of(path: Path) -> str:
    if path.is_dir():
        return "hf"
    return {".jsonl": "jsonl", ".txt": "txt", ".json": "json", ".yml": "yaml", ".yaml": "yaml"}[path.suffix.lower()]


def scan(files: Sequence[Path], chunk_bytes: int | None = None) -> tuple[str, list[Chunk]]:
    """Hash the files' contents and split them into chunks (default CHUNK_BYTES), in one read of each.

    Returns (hex digest over every file's bytes and relative order, chunks).
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    total = hashlib.blake2b(digest_size=20)
    chunks: list[Chunk] = []
    for path in files:
        kind = kind_of(path)
        if kind == "hf":
            for sub in sorted(path.rglob("*")):
                if sub.is_file():
                    total.update(str(sub.relative_to(path)).encode())
                    _hash_file(sub, total)
            chunks.append(Chunk(str(path), kind))
            continue
        total.update(b"\0file\0")
        if kind not in ("jsonl", "txt"):
            _hash_file(path, total)
            chunks.append(Chunk(str(path), kind))
            continue
        chunks.extend(_split_lines(path, kind, chunk_bytes, total))
    return total.hexdigest(), chunks


def stamp(files: Sequence[Path]) -> str:
    """A cheap identity of the files (path, size, mtime): :func:`scan`'s digest is remembered under it."""
    h = hashlib.blake2b(digest_size=20)
    for path in files:
        for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _hash_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)


def _split_lines(path: Path, kind: str, chunk_bytes: int, h: Any) -> list[Chunk]:
    """Chunks of ~chunk_bytes ending at newlines, with the line number each starts at."""
    chunks: list[Chunk] = []
    start, start_line, newlines, base = 0, 1, 0, 0  # newlines: counted so far in the open chunk
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            counted = 0  # block[:counted] is already in `newlines`
            while True:
                rel = max(start + chunk_bytes - 1 - base, counted)
                nl = block.find(b"\n", rel) if rel < len(block) else -1
                if nl < 0:
                    break
                newlines += block.count(b"\n", counted, nl + 1)
                chunks.append(Chunk(str(path), kind, start, base + nl + 1, start_line))
                start, start_line, newlines, counted = base + nl + 1, start_line + newlines, 0, nl + 1
            newlines += block.count(b"\n", counted)
            base += len(block)
    if base > start or not chunks:
        chunks.append(Chunk(str(path), kind, start, base, start_line))
    return chunks


# ---- reading one chunk ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """A record's location for error messages."""

    file: str
    index: int | None = None  # record index in the file (0-based) where it is known
    line: int | None = None

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.index is not None:
            parts.append(f"record {self.index}")
        return ", ".join(parts)


def read_chunk(chunk: Chunk) -> Iterator[tuple[Where | int, Any]]:
    """Yield (location, record) for every record of ``chunk``.

    For line-based kinds the location is the bare line number (an int, cheap to make); callers
    build a :class:`Where` only when they need to report a problem. Raises DataError/FormatError
    naming file and line (or byte offset) for malformed input.
    """
    if chunk.kind == "jsonl":
        return _read_jsonl(chunk)
    if chunk.kind == "txt":
        return _read_txt(chunk)
    if chunk.kind == "json":
        return _read_json(Path(chunk.file))
    if chunk.kind == "yaml":
        return _read_yaml(Path(chunk.file))
    return _read_hf(Path(chunk.file))


def _lines(chunk: Chunk) -> Iterator[tuple[int, str]]:
    with open(chunk.file, "rb") as f:
        f.seek(chunk.start)
        offset, line_no = chunk.start, chunk.first_line
        while offset < chunk.end:
            raw = f.readline()
            if not raw:
                break
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FormatError(
                    f"{chunk.file}, line {line_no}: invalid UTF-8 at byte offset {offset + e.start} "
                    f"({e.reason}); re-save the file as UTF-8"
                ) from None
            yield line_no, text
            offset += len(raw)
            line_no += 1


def _read_jsonl(chunk: Chunk) -> Iterator[tuple[int, Any]]:
    loads = json.loads
    for line_no, text in _lines(chunk):
        if not text.strip():
            continue
        try:
            yield line_no, loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{chunk.file}, line {line_no}: not valid JSON: {e.msg} at column {e.colno}") from None


def _read_txt(chunk: Chunk) -> Iterator[tuple[int, Any]]:
    for line_no, text in _lines(chunk):
        text = text.rstrip("\r\n")
        if text.strip():
            yield line_no, text


def _read_json(path: Path) -> Iterator[tuple[Where, Any]]:
    """A JSON array decoded element by element (or JSON values one after another)."""
    reader = _JsonStream(path)
    for index, (line, value) in enumerate(reader):
        yield Where(str(path), index, line), value


class _JsonStream:
    """Incremental reader of ``[v, v, ...]`` or ``v v ...`` with bounded memory per element."""

    def __init__(self, path: Path, block: int = 1 << 20):
        self.path, self.block = path, block
        self.decoder = json.JSONDecoder()

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buf, pos, line, consumed_bytes, eof = "", 0, 1, 0, False
        shift = 0  # columns of buf's first line already dropped (a long minified line)
        read_size = self.block  # grows while one element spans many reads, reset after it
        array: bool | None = None
        with open(self.path, "rb") as f:

            def more() -> bool:
                nonlocal buf, pos, line, consumed_bytes, eof, shift, read_size
                if eof:
                    return False
                raw = f.read(read_size)
                pending = len(utf8.getstate()[0])
                try:
                    text = utf8.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise FormatError(
                        f"{self.path}: invalid UTF-8 at byte offset {consumed_bytes - pending + e.start} "
                        f"({e.reason}); re-save the file as UTF-8"
                    ) from None
                consumed_bytes += len(raw)
                eof = not raw
                # drop what was decoded; keep the current line's start for error columns unless the
                # line is very long (minified JSON is one line), then remember the dropped width
                newline = buf.rfind("\n", 0, pos)
                cut = newline + 1 if pos - newline - 1 <= self.block else pos
                line += buf.count("\n", 0, cut)
                shift = (cut - newline - 1) if newline >= 0 else shift + cut
                buf, pos = buf[cut:] + text, pos - cut
                return True

            def skip_ws() -> bool:
                nonlocal pos
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if pos < len(buf):
                        return True
                    if not more():
                        return False

            def where() -> str:
                return f"{self.path}, line {line + buf.count(chr(10), 0, pos)}"

            while True:
                if not skip_ws():
                    if array:
                        raise FormatError(
                            f"{where()}: not valid JSON: the file ends inside the top-level array (missing ']')"
                        )
                    return
                if array is None:
                    array = buf[pos] == "["
                    if array:
                        pos += 1
                        continue
                elif array and buf[pos] == "]":
                    pos += 1
                    if skip_ws():
                        raise FormatError(f"{where()}: not valid JSON: text after the closing ']' of the array")
                    return
                start_line = line + buf.count("\n", 0, pos)
                while True:
                    try:
                        value, end = self.decoder.raw_decode(buf, pos)
                        if end == len(buf) and not eof and isinstance(value, (int, float)):
                            raise json.JSONDecodeError("number may continue", buf, end)
                        break
                    except json.JSONDecodeError as e:
                        if not more():
                            raise FormatError(
                                f"{self.path}, line {e.lineno + line - 1}: not valid JSON: {e.msg} "
                                f"at column {e.colno + (shift if e.lineno == 1 else 0)}"
                            ) from None
                        read_size = min(read_size * 2, 1 << 28)
                pos, read_size = end, self.block
                yield start_line, value
                if array:
                    if not skip_ws():
                        continue
                    if buf[pos] == ",":
                        pos += 1
                    elif buf[pos] != "]":
                        raise FormatError(f"{where()}: not valid JSON: expected ',' or ']' after an array element")


def _read_yaml(path: Path) -> Iterator[tuple[Where, Any]]:
    import yaml

    loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)  # every scalar as a string: 'yes' stays 'yes'
    try:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(
                f"{path}: invalid UTF-8 at byte offset {e.start} ({e.reason}); re-save the file as UTF-8"
            ) from None
        doc = yaml.load(raw, Loader=loader)  # noqa: S506 - BaseLoader builds only str/list/dict
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        raise FormatError(f"{path}{at}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
        raise DataError(f"{path}: expected a chatterbot-corpus file with a top-level 'conversations' list")
    for index, record in enumerate(doc["conversations"]):
        yield Where(str(path), index), record


def _read_hf(path: Path) -> Iterator[tuple[Where, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: this folder was written by `datasets` (save_to_disk); "
            f"`pip install datasets` to read it, or export it to JSON Lines"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for index, record in enumerate(ds):
        yield Where(str(path), index), record
