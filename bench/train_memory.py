#!/usr/bin/env python3
"""Where a LoRA training step's peak RSS goes: bench_moe.py's worker, phase by phase.

Builds the worker of bench_moe.py (tunex or transformers + PEFT, the same model folder, batch and
step) in this process and reports, in MB:

* the resident set after each phase of the build (torch import, the contender's imports, model
  load, adapter wrap, optimizer), and the peak of each phase of a step (forward, backward,
  optimizer step): each phase's peak is read from VmHWM after resetting it (``clear_refs``);
* what the forward keeps for backward, node by node (walking the autograd graph from the loss:
  each node's saved tensors, every byte range counted once, split into arena and heap memory);
* tunex's activation arena (reserved, the step's high-water) and glibc's heap (mallinfo2: in use,
  free but mapped, mmapped chunks) at the forward's end and after the step.

Usage: python bench/train_memory.py {tunex,hf} {qwen3,mixtral} [--steps N] [--folder DIR]
The model folder is made (as bench_moe.make_model) when --folder is not given.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import peak_rss_mb, rss_mb  # noqa: E402


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def mallinfo() -> _Mallinfo2 | None:
    """glibc's mallinfo2 (None elsewhere)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn()


def heap() -> str:
    """glibc's heap: bytes in use, free but still mapped, in mmapped chunks (MB)."""
    m = mallinfo()
    if m is None:
        return "mallinfo2 n/a"
    mb = 1 << 20
    return f"heap in use {m.uordblks / mb:.0f}, free {m.fordblks / mb:.0f}, mmapped {m.hblkhd / mb:.0f}"


def saved_by_node(loss, arena_storages: set[int], weights: set[int]) -> dict[str, dict[str, float]]:
    """The tensors the graph behind ``loss`` keeps, node name -> MB by where they lie ("arena": the
    activation arena, "weights": a parameter's or buffer's memory, "heap": elsewhere) and "count";
    each byte range is counted once, at the first node that keeps it."""
    import torch

    seen: set[tuple[int, int]] = set()
    per: dict[str, dict[str, float]] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        stack.extend(n for n, _ in node.next_functions)
        tensors = []
        try:
            tensors.extend(t for t in (node.saved_tensors or ()) if isinstance(t, torch.Tensor))
        except (AttributeError, RuntimeError):
            pass
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except RuntimeError:
                    continue
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                elif isinstance(value, (tuple, list)):
                    tensors.extend(v for v in value if isinstance(v, torch.Tensor))
        entry = per.setdefault(type(node).__name__, {"count": 0, "arena": 0.0, "weights": 0.0, "heap": 0.0})
        for t in tensors:
            if t.numel() == 0:
                continue
            key = (t.data_ptr(), t.numel() * t.element_size())
            if key in seen:
                continue
            seen.add(key)
            base = t.untyped_storage().data_ptr()
            where = "arena" if base in arena_storages else "weights" if base in weights else "heap"
            entry["count"] += 1
            entry[where] += key[1] / (1 << 20)
    return per


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("who", choices=("tunex", "hf"))
    parser.add_argument("family", choices=("qwen3", "mixtral"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as the bench)")
    args = parser.parse_args()
    base = rss_mb()
    import torch

    print(f"torch import: {rss_mb():.0f} MB (python alone {base:.0f})")

    tmp = None
    folder = args.folder
    if folder is None:  # made in a child so that transformers' import does not count here
        import subprocess

        tmp = tempfile.TemporaryDirectory(prefix="tunex-train-memory-")
        folder = tmp.name
        code = f"import bench_moe; bench_moe.make_model({args.family!r}, {folder!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    before = rss_mb()
    if args.who == "tunex":
        import tunex.dist.wrap  # noqa: F401
        import tunex.train.build  # noqa: F401
        import tunex.train.loop  # noqa: F401
    else:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    print(f"{args.who} imports: +{rss_mb() - before:.0f} MB -> {rss_mb():.0f} MB; {heap()}")
    mods = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "triton", "peft", "tunex"))
    print(
        f"  modules loaded: {len(sys.modules)}; transformers {sum(m.startswith('transformers') for m in mods)}, "
        f"triton {sum(m.startswith('triton') for m in mods)}, peft {sum(m.startswith('peft') for m in mods)}"
    )
    before, at_import = rss_mb(), mallinfo()
    model, forward, opt = build(args.who, folder)
    print(f"model build (load, adapters, optimizer, batch): +{rss_mb() - before:.0f} MB -> {rss_mb():.0f} MB; {heap()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = []
    for i in range(args.steps):
        reset_peak()
        started = time.process_time()
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(peak_rss_mb())
        print(f"step {i}: peak {peaks[-1]:.0f} MB, after {rss_mb():.0f} MB, cpu {time.process_time() - started:.2f} s")
    print(f"peak RSS over the steps (what the bench reports): {max(peaks):.0f} MB")
    summary(model, before, at_import, max(peaks))
    phases(model, forward, opt)
    if tmp is not None:
        tmp.cleanup()


def build(who: str, folder: str):
    """bench_moe's worker for ``who`` on random tokens (bench_moe.tunex_parts / hf_parts): the
    model, a forward returning the loss, and the optimizer."""
    import bench_moe

    if who == "tunex":
        _, model, module, opt, batch = bench_moe.tunex_parts(folder, "random")
        return model, lambda: module(batch["input_ids"], batch["labels"], batch["position_ids"], None), opt
    m, opt, x, labels, _ = bench_moe.hf_parts(folder, "random")
    return m, lambda: m(input_ids=x, labels=labels).loss, opt


def summary(model, imported_mb: float, at_import, peak_mb: float) -> None:
    """The peak split into: the process after its imports, the model's weights (file-mapped or
    copied, all of them are touched by a step), the activation arena, glibc's heap growth from the
    imports to after the steps (mapped chunks other than the arena's blocks included: what a step
    keeps between steps, its temporaries at their largest and the holes between them, as long as
    glibc keeps the heap mapped, which tunex's malloc settings do) and the rest (code and
    libraries' pages a step touches, thread stacks; with a heap that shrinks after the peak, as
    transformers' does under glibc's defaults, that too)."""
    weights = sum(t.numel() * t.element_size() for t in {*model.parameters(), *model.buffers()}) / 2**20
    arena = getattr(getattr(model, "model", model), "__dict__", {}).get("_arena")
    arena_mb = arena.reserved_bytes / 2**20 if arena is not None else 0.0
    now = mallinfo()
    heap_mb = 0.0
    if now is not None and at_import is not None:
        heap_mb = (now.arena + now.hblkhd - at_import.arena - at_import.hblkhd) / 2**20 - arena_mb
    rest = peak_mb - imported_mb - weights - arena_mb - heap_mb
    print(
        f"  = imports {imported_mb:.0f} + weights {weights:.0f} + arena {arena_mb:.0f} + heap growth {heap_mb:.0f} "
        f"+ rest {rest:.0f} MB"
    )


def phases(model, forward, opt) -> None:
    """One more step, phase by phase, with the graph's saved tensors at the forward's end."""
    print(f"\nphases of a step, resident before: {rss_mb():.0f} MB; {heap()}")
    reset_peak()
    loss = forward()
    print(f"  forward: peak {peak_rss_mb():.0f}, end {rss_mb():.0f}; {heap()}")
    arena = getattr(getattr(model, "model", model), "__dict__", {}).get("_arena")
    storages = set()
    if arena is not None:
        storages = {block.untyped_storage().data_ptr() for block, _ in arena._blocks}
        print(f"  arena: reserved {arena.reserved_bytes / 2**20:.0f} MB, last step used {arena._used / 2**20:.0f} MB")
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    per = saved_by_node(loss, storages, weights)
    total = {k: sum(e[k] for e in per.values()) for k in ("arena", "weights", "heap")}
    print(
        f"  saved for backward: {total['arena']:.1f} MB in the arena, {total['heap']:.1f} MB elsewhere "
        f"(and {total['weights']:.1f} MB of weights)"
    )
    for name, e in sorted(per.items(), key=lambda kv: -(kv[1]["arena"] + kv[1]["heap"])):
        if e["arena"] + e["heap"] >= 0.1:
            print(f"    {name:40s} {e['count']:4d} tensors: arena {e['arena']:6.1f} MB, heap {e['heap']:6.1f} MB")
    reset_peak()
    loss.backward()
    del loss
    print(f"  backward: peak {peak_rss_mb():.0f}, end {rss_mb():.0f}; {heap()}")
    reset_peak()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"  optimizer: peak {peak_rss_mb():.0f}, end {rss_mb():.0f}; {heap()}")


if __name__ == "__main__":
    main()
