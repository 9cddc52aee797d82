"""Tokenize a dataset once and keep the result on disk as flat numpy arrays.

A store is a folder with ``ids.bin`` (int32 token ids of every sample back to back), ``mask.bin``
(uint8, 1 where the token is a target), ``lengths.bin`` (int64 tokens per sample) and
``meta.json`` (counts, and what the store was built from). The arrays are opened with
``np.memmap``: a training run touches only the pages of the samples it reads, so memory stays flat
however large the data is.

The folder name is a hash of everything the encoded output depends on: the data files' contents,
the tokenizer, the template and system prompt, the format and max_length, and the encoder version.
Building writes into a temporary folder renamed into place at the end, so an interrupted build
never leaves a half store that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunex.data import formats as F
from tunex.data import sources as S
from tunex.data.encode import ENCODER_VERSION, Encoded, Encoder, Prepared, tokenizer_fingerprint
from tunex.errors import DataError, TunexError
from tunex.io.atomic import naming, partial_path, publish, sweep, write_text

PREFERENCE_FORMATS = ("preference", "chatterbot_pairs")  # as tunex.config's
BATCH = 512  # samples per tokenizer call: enough for the Rust side to spread over threads


@dataclass
class Recipe:
    """Everything that decides the encoded output (picklable: sent to worker processes)."""

    fmt: str
    tokenizer: Any
    template_name: str
    system: str
    max_length: int

    def encoder(self) -> Encoder:
        template = None
        if self.fmt != "pretrain":
            from tunex.templates import get_template

            template = get_template(self.template_name, self.tokenizer, system=self.system)
        if self.fmt in PREFERENCE_FORMATS:
            from tunex.data.preference import PairEncoder

            return PairEncoder(self.tokenizer, template=template, system=self.system, max_length=self.max_length)
        return Encoder(self.tokenizer, template=template, system=self.system, max_length=self.max_length)

    def fingerprint(self) -> str:
        parts = [
            ENCODER_VERSION + _pair_version(self.fmt),
            self.fmt,
            str(self.max_length),
            tokenizer_fingerprint(self.tokenizer),
        ]
        if self.fmt != "pretrain":
            from tunex.templates import get_template

            t = get_template(self.template_name, self.tokenizer, system=self.system)
            # how the template renders a probe: changes to the template code invalidate caches too
            probe = [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "v"},
                {"role": "assistant", "content": "b"},
            ]
            try:
                rendered = repr([(x.text, x.is_target) for x in t.segments(probe)])
            except TunexError:  # templates without a system role
                rendered = repr([(x.text, x.is_target) for x in t.segments(probe[1:])])
            parts += [t.name, t.jinja_source or "", rendered, self.system]
        return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def _pair_version(fmt: str) -> str:
    if fmt not in PREFERENCE_FORMATS:
        return ""
    from tunex.data.preference import PAIR_VERSION

    return "-pairs" + PAIR_VERSION


@dataclass
class Store:
    """The memory-mapped arrays of one tokenized dataset."""

    folder: Path
    ids: np.ndarray  # int32 (N,)
    mask: np.ndarray  # uint8 (N,)
    lengths: np.ndarray  # int64 (S,)
    offsets: np.ndarray  # int64 (S+1,) start of each sample in ids
    meta: dict

    @classmethod
    def open(cls, folder: Path) -> Store:
        meta = json.loads((folder / "meta.json").read_text())
        lengths = _memmap(folder / "lengths.bin", np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(
            folder,
            _memmap(folder / "ids.bin", np.int32),
            _memmap(folder / "mask.bin", np.uint8),
            lengths,
            offsets,
            meta,
        )

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]


def _memmap(path: Path, dtype: Any) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ---- reading + encoding one chunk (runs in worker processes too) ----------------------------------


def records(chunk: S.Chunk, fmt: str) -> Iterator[tuple[Any, Any, F.Sample]]:
    """(location, raw record, mapped sample) for every record of ``chunk``; errors name the record."""
    to_sample = F.mapper(fmt)
    for where, record in S.read_chunk(chunk):
        try:
            yield where, record, to_sample(record)
        except F.RecordError as e:
            raise DataError(f"{locate(chunk, where)}: {e}") from None


def locate(chunk: S.Chunk, where: Any) -> S.Where:
    return where if isinstance(where, S.Where) else S.Where(chunk.file, line=where)


def encode_chunk(chunk: S.Chunk, recipe: Recipe, encoder: Encoder | None = None) -> tuple[Encoded, int]:
    """Encode every record of ``chunk``; returns (encoded samples, records read).

    Reading, mapping and rendering (Python) run in a helper thread one batch ahead of the
    tokenizer, which releases the GIL: the two halves overlap.
    """
    encoder = encoder or recipe.encoder()
    counter = [0]
    parts = [encoder.tokenize(p) for p in _ahead(_prepared(chunk, recipe, encoder, counter))]
    return _concat(parts), counter[0]


def _prepared(chunk: S.Chunk, recipe: Recipe, encoder: Encoder, counter: list[int]) -> Iterator[Prepared]:
    batch: list[F.Sample] = []
    wheres: list[Any] = []
    for where, _, sample in records(chunk, recipe.fmt):
        batch.append(sample)
        wheres.append(where)
        counter[0] += 1
        if len(batch) == BATCH:
            yield _prepare(encoder, batch, wheres, chunk)
            batch, wheres = [], []
    if batch:
        yield _prepare(encoder, batch, wheres, chunk)


def _prepare(encoder: Encoder, batch: list, wheres: list, chunk: S.Chunk) -> Prepared:
    try:
        return encoder.prepare(batch)
    except TunexError:
        # find the record the template rejected, to name it
        for sample, where in zip(batch, wheres):
            try:
                encoder.prepare([sample])
            except TunexError as e:
                raise type(e)(f"{locate(chunk, where)}: {e}") from None
        raise


_DONE = object()


def _ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run the iterator ``items`` in a thread, up to ``depth`` items ahead of the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():  # the consumer may have gone: never block forever
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            offer((_DONE, e))

    worker = threading.Thread(target=produce, name="tunex-data-prepare", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _concat(parts: Sequence[Encoded]) -> Encoded:
    if not parts:
        return Encoded(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64))
    return Encoded(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.mask for p in parts]),
        np.concatenate([p.lengths for p in parts]),
        sum(p.dropped for p in parts),
        sum(p.truncated for p in parts),
        sum(p.identical for p in parts),
    )


_WORKER: dict[str, Any] = {}


def _worker_init(recipe: Recipe) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER["recipe"], _WORKER["encoder"] = recipe, recipe.encoder()


def _worker_encode(chunk: S.Chunk) -> tuple[Encoded, int]:
    return encode_chunk(chunk, _WORKER["recipe"], _WORKER["encoder"])


# ---- building a store -----------------------------------------------------------------------------


def build(
    paths: str | Sequence[str],
    recipe: Recipe,
    cache_root: Path,
    *,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Store:
    """The store of ``paths`` encoded by ``recipe``: opened from the cache or built into it.

    Raises:
        DataError: a record is malformed (naming it), or no sample is left to train on.
        FormatError: a file is not valid JSON / YAML / UTF-8 (naming file and line or byte).
    """
    F.mapper(recipe.fmt)  # unknown format -> the list of valid ones, before any reading
    files = S.list_files(paths, recipe.fmt)
    recipe_id = recipe.fingerprint()
    # Hashing the contents reads every byte; the digest is remembered under the files' (path, size,
    # mtime) so an unchanged dataset is recognised without reading it again.
    remembered = cache_root / "content" / S.stamp(files)
    content = remembered.read_text().strip() if remembered.is_file() else ""
    if content:
        folder = cache_root / _store_name(content, recipe_id)
        if (folder / "meta.json").is_file():
            return Store.open(folder)
    content, chunks = S.scan(files)  # the bytes themselves decide
    _write_text_atomic(remembered, content)
    key = _store_name(content, recipe_id)
    folder = cache_root / key
    if (folder / "meta.json").is_file():
        return Store.open(folder)
    with _exclusive(cache_root / f".{key}.lock"):  # several ranks, one tokenizes; the rest wait and open
        if (folder / "meta.json").is_file():
            return Store.open(folder)
        return _build_into(folder, key, paths, files, chunks, recipe, num_workers, progress)


def _build_into(
    folder: Path,
    key: str,
    paths: Any,
    files: list[Path],
    chunks: list[S.Chunk],
    recipe: Recipe,
    num_workers: int,
    progress: Callable[[int, int], None] | None,
) -> Store:
    cache_root = folder.parent
    sweep(cache_root)  # stores of killed builders
    tmp = partial_path(folder)
    try:
        tmp.mkdir()
        meta = _write(tmp, chunks, recipe, num_workers, progress)
        meta.update(
            files=[str(f) for f in files],
            format=recipe.fmt,
            template=recipe.template_name,
            max_length=recipe.max_length,
        )
        if meta["samples"] == 0:
            raise DataError(_empty_message(paths, meta))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            publish(tmp, folder)
        except FileExistsError:  # another process finished the same store first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = naming(e, folder)  # a full disk's failed write names the store it was for
        if named is e:
            raise
        raise named from e
    return Store.open(folder)


def _write(
    tmp: Path, chunks: list[S.Chunk], recipe: Recipe, num_workers: int, progress: Callable[[int, int], None] | None
) -> dict:
    totals = dict(records=0, dropped=0, truncated=0, samples=0, tokens=0, target_tokens=0)
    if recipe.fmt in PREFERENCE_FORMATS:  # dropped and truncated count pairs
        totals["identical_pairs"] = 0
    with (
        open(tmp / "ids.bin", "wb") as ids,
        open(tmp / "mask.bin", "wb") as mask,
        open(tmp / "lengths.bin", "wb") as lengths,
    ):
        for done, (enc, count) in enumerate(_encoded_chunks(chunks, recipe, num_workers), 1):
            ids.write(enc.ids.tobytes())
            mask.write(enc.mask.tobytes())
            lengths.write(enc.lengths.tobytes())
            totals["records"] += count
            totals["dropped"] += enc.dropped
            totals["truncated"] += enc.truncated
            if "identical_pairs" in totals:
                totals["identical_pairs"] += enc.identical
            totals["samples"] += len(enc.lengths)
            totals["tokens"] += len(enc.ids)
            totals["target_tokens"] += int(enc.mask.sum(dtype=np.int64))
            if progress:
                progress(done, len(chunks))
    return totals


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent builders each write, the rename keeps one
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _store_name(content: str, recipe_id: str) -> str:
    return hashlib.blake2b(f"{content}\0{recipe_id}".encode(), digest_size=16).hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    write_text(path, text)  # partial names are unique per call, so threads of one pid never collide


def _encoded_chunks(chunks: list[S.Chunk], recipe: Recipe, num_workers: int) -> Iterator[tuple[Encoded, int]]:
    if num_workers <= 0 or len(chunks) < 2:
        encoder = recipe.encoder()
        for chunk in chunks:
            yield encode_chunk(chunk, recipe, encoder)
        return
    import multiprocessing

    # spawn, not fork: the parent's tokenizer thread pool does not survive a fork
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(num_workers, len(chunks)), initializer=_worker_init, initargs=(recipe,)) as pool:
        yield from pool.imap(_worker_encode, chunks)


def _empty_message(paths: Any, meta: dict) -> str:
    shown = paths if isinstance(paths, str) else ", ".join(paths)
    return (
        f"no sample left to train on in {shown}: {meta['records']} records read, {meta['dropped']} "
        f"dropped without a target (no assistant reply to learn, an empty text, or a reply cut off "
        f"by max_length={meta['max_length']}); check data.format and data.max_length"
    )
