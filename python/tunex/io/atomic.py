"""Crash-safe writes: every file or folder tunex writes appears whole or not at all.

The rule lives in Rust (``rust/src/partial.rs``) and is shared with the Rust writers: output is
written under an owner-stamped partial name beside its target (``.NAME.tunex-TAG.TOKEN``, the token
naming host, boot, pid and process start time), fsynced, and renamed into place in one step (a
folder as a whole, then its parent fsynced). Each writer first sweeps partials in the folder it
writes into whose owner is provably dead; a live owner's, or another host's, is never touched.

- :func:`atomic_file`: a single file (``write_text`` / ``write_bytes`` for small ones).
- :func:`atomic_folder`: a whole folder, built in a partial and published by one rename.
- :func:`scratch_folder`: a work folder beside an output, removed at the end (or swept after a kill).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tunex import _native


def sweep(folder: str | os.PathLike) -> list[Path]:
    """Remove the partials in ``folder`` whose owner is provably dead; returns what was removed."""
    return [Path(p) for p in _native.sweep_partials(os.fspath(folder))]


def partial_path(target: str | os.PathLike, tag: str = "partial") -> Path:
    """A fresh owner-stamped partial name beside ``target``."""
    return Path(_native.partial_path(os.fspath(target), tag))


def is_partial(name: str) -> bool:
    """Whether ``name`` is an owner-stamped partial (of any owner, live or dead)."""
    return _native.partial_fate(name) is not None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:  # on a read-only filesystem even a missing name fails with EROFS: never mask the cause
        with contextlib.suppress(OSError):
            path.unlink()


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder in it (bottom up)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open a folder for fsync; the rename is all we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _inside_partial(filename: Any) -> bool:
    try:
        return any(is_partial(part) for part in Path(os.fsdecode(filename)).parts)
    except TypeError:
        return False


def naming(error: BaseException, target: Path) -> BaseException:
    """``error`` as it is when it names a file the user knows; an OSError that names none (a failed
    ``write`` or ``close``: ENOSPC, EFBIG, EIO) or only a hidden partial (creating it in a read-only
    folder) as the same error naming ``target``, in one line."""
    if not isinstance(error, OSError):
        return error
    if error.filename is not None and not _inside_partial(error.filename):
        return error
    if error.errno is None:  # a short write (numpy's tofile): the disk filled up or a size limit hit
        return OSError(f"{error} while writing {target} (a full disk?); nothing was written there")
    reason = error.strerror or str(error)
    if error.filename is not None or ".tunex-" in reason:  # its text names a partial the user never sees
        reason = os.strerror(error.errno)
    return OSError(error.errno, f"{reason} while writing {target}; nothing was written there", str(target))


@contextlib.contextmanager
def errors_naming(target: str | os.PathLike) -> Iterator[None]:
    """Re-raise an error of the body as :func:`naming` words it for ``target``."""
    try:
        yield
    except BaseException as e:
        named = naming(e, Path(target))
        if named is e:
            raise
        raise named from e


def make_partial_dir(tmp: Path, target: Path) -> None:
    """mkdir ``tmp``; a failure (a read-only or full folder) names ``target``, not the partial."""
    with errors_naming(target):
        tmp.mkdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a partial path beside ``path`` for a writer that opens files by name; once the body
    has closed it, it is fsynced and renamed over ``path`` (an existing file is replaced in one
    step). On an error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)
    tmp = partial_path(target)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as e:
        _remove(tmp)
        named = naming(e, target)
        if named is e:
            raise
        raise named from e
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a partial beside ``path`` for writing; on success it is fsynced and renamed over
    ``path`` (an existing file is replaced in one step); on an error it is removed."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def publish(partial: Path, target: Path, *, overwrite: bool = False, fsync: bool = True) -> None:
    """fsync the finished folder ``partial`` (from :func:`partial_path`) and rename it to ``target``
    in one step. A missing target that another writer creates meanwhile is FileExistsError, an
    existing one too unless ``overwrite`` (then swapped atomically). The partial stays on failure."""
    if fsync:
        fsync_tree(partial)
    _native.publish(os.fspath(partial), os.fspath(target), overwrite)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Build a folder in a partial beside ``target`` and publish it whole.

    Yields the partial folder to fill. On success every file in it is fsynced and it is renamed to
    ``target`` in one step: a missing target is created (if another writer created it meanwhile,
    FileExistsError and this one's partial is removed); an existing one is refused before anything
    is written unless ``overwrite``, then swapped atomically. On an error the partial is removed.
    """
    out = Path(target)
    if out.exists() and not overwrite:
        raise FileExistsError(17, f"{out} already exists; choose another path or overwrite it", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)
    tmp = partial_path(out)
    make_partial_dir(tmp, out)
    try:
        yield tmp
        publish(tmp, out, overwrite=overwrite, fsync=fsync)
    except BaseException as e:
        _remove(tmp)
        named = naming(e, out)
        if named is e:
            raise
        raise named from e


def replaceable(target: Path, ours: Callable[[str], bool], what: str) -> None:
    """Refuse to replace an existing folder ``target`` that holds a file ``ours`` does not accept
    (a writer replacing its previous output as a whole must not delete someone else's files)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(17, f"{target} is a file; {what} needs a folder path", str(target))
    foreign = sorted(p.name for p in target.iterdir() if not ours(p.name))
    if foreign:
        raise FileExistsError(
            17,
            f"{target} already holds {foreign[0]!r}, which is not part of {what}; "
            "write to a new or empty folder (the output replaces the folder as a whole)",
            str(target),
        )


@contextlib.contextmanager
def scratch_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """A work folder next to ``beside`` (on the filesystem its output goes to), removed at the end;
    after a kill the next writer's sweep removes it."""
    near = Path(beside)
    near.parent.mkdir(parents=True, exist_ok=True)
    sweep(near.parent)
    tmp = partial_path(near, "scratch")
    make_partial_dir(tmp, near)
    try:
        yield tmp
    except BaseException as e:
        named = naming(e, near)  # a write into the scratch that failed names the output it was for
        if named is e:
            raise
        raise named from e
    finally:
        _remove(tmp)


__all__ = [
    "atomic_file",
    "atomic_folder",
    "atomic_path",
    "errors_naming",
    "fsync_tree",
    "is_partial",
    "make_partial_dir",
    "naming",
    "partial_path",
    "publish",
    "replaceable",
    "scratch_folder",
    "sweep",
    "write_bytes",
    "write_text",
]
