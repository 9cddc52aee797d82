"""``tunex doctor``: what runs on this machine and why.

Prints which implementation the kernel registry (tunex.kernels.registry) chooses for each op on
CPU float32, CPU bfloat16 (autocast) and CUDA, for training and inference (the conditions are
pure, so the CUDA rows are answered on a machine without a GPU too); the native extension's
version and build; the CPU's SIMD features; torch / CUDA / cuDNN / Triton versions (triton's from
its package metadata, without importing it); free disk of the work and cache folders; and every
``TUNEX_*`` switch set, flagging names that are no tunex switch. ``--json`` prints one object.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import click

COLUMNS = ("cpu-fp32", "cpu-bf16", "cuda")
MODES = ("train", "inference")
# representative shapes: a SmolLM2-135M layer at batch 4 x 256 (decode: one row)
_HEAD_DIM, _HIDDEN, _TOKENS = 64, 576, 1024


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(doctor)


def representative(op: str, column: str, mode: str):
    """The facts of a typical call of ``op`` in that column and mode."""
    import torch

    from tunex.kernels.registry import Facts

    # matmul_f32 runs inside autograd Functions (and no-grad code): grad mode is off there in training too
    train = mode == "train" and op != "matmul_f32"
    rows = 1 if mode == "inference" else _TOKENS  # inference: a decode step, one token per row
    device = "cuda" if column == "cuda" else "cpu"
    if column == "cuda":
        dtype = torch.bfloat16
    elif column == "cpu-bf16" and op in ("matmul_f32", "decode_linear"):
        dtype = torch.bfloat16  # under CPU autocast the frozen-weight products run in bf16
    else:
        dtype = torch.float32  # activations stay float32 under tunex's CPU autocast mode
    return Facts(
        device,
        dtype,
        grad=train,
        autocast=column != "cpu-fp32",
        head_dim=_HEAD_DIM,
        arena=train and device == "cpu",  # CPU training runs inside the activation arena
        rows=rows,
        cols=_HIDDEN,
        macs=rows * _HIDDEN * _HIDDEN,
    )


def op_table() -> tuple[dict, dict]:
    """(op -> column -> mode -> implementation, the same with each implementation's verdict)."""
    from tunex.kernels import registry

    chosen: dict = {}
    reasons: dict = {}
    for op in registry.OPS:
        for column in COLUMNS:
            for mode in MODES:
                facts = representative(op, column, mode)
                try:
                    name = registry.choose(op, facts)
                except ValueError as e:  # a backend forced where it cannot run
                    name = f"error: {e}"
                chosen.setdefault(op, {}).setdefault(column, {})[mode] = name
                reasons.setdefault(op, {}).setdefault(column, {})[mode] = registry.explain(op, facts)
    return chosen, reasons


def native_info() -> dict:
    try:
        from tunex import _native
    except ImportError as e:
        return {"available": False, "error": str(e)}
    info: dict = {"available": True, "path": _native.__file__, "version": getattr(_native, "__version__", None)}
    build_info = getattr(_native, "build_info", None)
    if build_info is not None:
        info.update(build_info())
    else:
        info["build_info"] = "not in this build (rebuild the extension)"
    info["exports"] = sorted(n for n in dir(_native) if not n.startswith("_"))
    return info


def cpu_features() -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name":
                model = value.strip()
    except OSError:
        pass
    import torch

    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "source": "/proc/cpuinfo" if flags else "unavailable",
    }


def versions() -> dict:
    import torch

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    import tunex

    return {
        "tunex": getattr(tunex, "__version__", None),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": dist("triton"),
        "onednn": torch.backends.mkldnn.is_available(),
    }


def disk() -> dict:
    from tunex.models.hub import cache_root

    out = {}
    for name, path in (("work", Path.cwd()), ("cache", cache_root())):
        probe = path
        while not probe.exists() and probe != probe.parent:  # the cache folder may not exist yet
            probe = probe.parent
        usage = shutil.disk_usage(probe)
        out[name] = {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}
    return out


def switches() -> dict:
    from tunex import settings

    values = {name: settings.get(name) for name, s in settings.SWITCHES.items() if s.read_by == "python"}
    return {"in_force": settings.in_force(), "unknown": settings.unknown_in_force(), "effective": values}


def report() -> dict:
    sw = switches()  # first: a bad switch value is the error to report
    chosen, reasons = op_table()
    return {
        "ops": chosen,
        "why": reasons,
        "native": native_info(),
        "cpu": cpu_features(),
        "versions": versions(),
        "disk": disk(),
        "switches": sw,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _print(rep: dict) -> None:
    echo = click.echo
    echo("kernels (registry choice; train / inference, decoding one token):")
    width = max(len(op) for op in rep["ops"])
    echo(f"  {'op':<{width}}  " + "  ".join(f"{c:<28}" for c in COLUMNS))
    for op, cols in rep["ops"].items():
        cells = [f"{cols[c]['train']} / {cols[c]['inference']}" for c in COLUMNS]
        echo(f"  {op:<{width}}  " + "  ".join(f"{cell:<28}" for cell in cells))
    nat = rep["native"]
    echo("native extension:")
    if not nat["available"]:
        echo(f"  not importable: {nat['error']}")
    else:
        for key in ("version", "features", "target_arch", "simd_compiled", "simd_tier", "debug_build", "build_info"):
            if key in nat:
                echo(f"  {key}: {nat[key]}")
        echo(f"  exports: {len(nat['exports'])}")
    echo("cpu:")
    for key, value in rep["cpu"].items():
        echo(f"  {key}: {value}")
    echo("versions:")
    for key, value in rep["versions"].items():
        echo(f"  {key}: {value}")
    echo("disk:")
    for name, d in rep["disk"].items():
        echo(f"  {name}: {d['path']} ({_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])})")
    sw = rep["switches"]
    echo("switches set:" + ("" if sw["in_force"] else " none"))
    for name, value in sw["in_force"].items():
        flag = "  <- not a tunex switch (misspelt?)" if name in sw["unknown"] else ""
        echo(f"  {name}={value}{flag}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json: bool) -> None:
    """Show which kernel implementations run here, the native build, CPU features, versions,
    free disk and the TUNEX_* switches in force."""
    rep = report()
    if as_json:
        click.echo(json.dumps(rep, indent=1, default=str))
    else:
        _print(rep)
