"""SIGKILL every crash-safe writer at seeded random points (run by test_faults.py as a script).

``python fault_kill_harness.py ROOT SEED KILLS [WRITER ...]`` builds the inputs once, then for each
writer: a reference run (timed), KILLS runs into the same output each SIGKILLed after a seeded random
delay in [0, 1.2 x the reference time], and a final run to completion. Every run happens in a forked
child (so no interpreter start per kill); this process only forks, kills, hashes files and lists
folders, so it never holds a thread pool a fork would break. Each writer writes the same output
path every time (every other kill after removing the last output, so a kill lands both in a new
output and in the replacement of an old one), and the final run must sweep every partial the killed
ones left. Prints one JSON object: per writer, the counts and every problem found.

``python fault_kill_harness.py ROOT 0 0 --full-and-read-only [WRITER ...]`` runs each writer once into
a full and once into a read-only filesystem instead, and prints what each raised and left behind.
``--race`` runs each writer twice at once into one new output, and prints what each run raised and
whether the output is whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported through the exit code
            sys.stderr.write(f"child failed: {type(e).__name__}: {e}\n")
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return pid


def run(fn) -> float:
    start = time.perf_counter()
    _, status = os.waitpid(_child(fn), 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"a writer run failed (status {status})")
    return time.perf_counter() - start


def digest(path: Path) -> dict[str, str] | None:
    """{relative name: sha256} of a file or a folder's files; None when ``path`` does not exist."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


PARTIAL = re.compile(r"\.tunex-(partial|scratch|old|probe)\b")


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PARTIAL.search(p.name))


def partials_under(out: Path) -> list[str]:
    """Partials anywhere inside an output folder (the data cache's content memo has its own)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if PARTIAL.search(p.name)) if out.is_dir() else []


def build_inputs(root: Path) -> None:
    import torch
    import transformers
    from test_train_helpers import make_data, make_tokenizer, write_config

    model = root / "model"
    vocab = make_tokenizer(model)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(model, safe_serialization=True)
    data = make_data(root / "d", "pretrain")
    # for the data cache: enough text that tokenizing it takes a while (kills land inside the build)
    words = "the quick brown fox jumps over the lazy dog and keeps running through the long grass"
    lines = [json.dumps({"text": f"{i} {words} " * 30}) + "\n" for i in range(400)]
    (root / "cache_data.jsonl").write_text("".join(lines))
    write_config(root / "full.toml", model, data, "full", "pretrain", root / "w")
    write_config(root / "lora.toml", model, data, "lora", "pretrain", root / "w")

    from tunex.config import load_config
    from tunex.gguf_io import hf_to_gguf
    from tunex.models import load_model
    from tunex.peft import apply_lora, trainable_state_dict
    from tunex.train import checkpoint

    lm = load_model(model)
    full_state = {k: v.clone() for k, v in lm.state_dict().items()}
    m = load_config(root / "lora.toml").method
    apply_lora(lm, m.target_modules, m.r, m.alpha)
    lora_state = {k: torch.randn_like(v) * 0.02 for k, v in trainable_state_dict(lm).items()}
    checkpoint.save(root / "ck", 1, {"model": lora_state, "method": "lora"}, keep=0)
    checkpoint.save(root / "ck", 2, {"model": full_state, "method": "full"}, keep=0)
    hf_to_gguf(model, root / "model.gguf", "q8_0")


def writers(root: Path) -> dict:
    """name -> (output path, function that writes it, the folder its partials live in)."""

    def merge(out):
        from tunex.merge import merge

        merge(root / "model", root / "adapter", out, device="cpu", overwrite=True, max_shard_size="4MB")

    def save_sharded(out):
        import torch
        from tunex.io.sharded import save_sharded

        # every run writes its own value, so a folder mixing two runs' shards is caught
        save_sharded({f"t{i}": torch.full((256, 1024), float(os.getpid())) for i in range(12)}, out, "3MB")

    def pth_to_hf_adapter(out):
        from tunex.config import load_config
        from tunex.train.export import convert_checkpoint

        convert_checkpoint(load_config(root / "lora.toml"), root / "ck" / "iter_1.pth", out, fp32=True)

    def pth_to_hf_full(out):
        from tunex.config import load_config
        from tunex.train.export import convert_checkpoint

        convert_checkpoint(load_config(root / "full.toml"), root / "ck" / "iter_2.pth", out, max_shard_size="4MB")

    def quantize(out):
        from tunex.quant.checkpoint import quantize_checkpoint

        quantize_checkpoint(root / "model", out, overwrite=True)

    def gguf_to_hf(out):
        from tunex.gguf_io import gguf_to_hf

        gguf_to_hf(root / "model.gguf", out)

    def hf_to_gguf(out):
        from tunex.gguf_io import hf_to_gguf

        hf_to_gguf(root / "model", out, "f16")

    def train_checkpoint(out):
        import torch
        from tunex.train import checkpoint

        torch.manual_seed(0)
        checkpoint.save(out.parent, 7, {"model": {f"w{i}": torch.randn(512, 512) for i in range(8)}}, keep=0)

    import torch

    # built here, once (one torch thread, so the forks inherit no thread pool): each forked run
    # goes straight to writing
    torch.manual_seed(0)
    lm = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    opt = torch.optim.AdamW(lm.parameters())
    lm(torch.randn(2, 512)).sum().backward()
    opt.step()

    def sharded_checkpoint(out):
        import random

        from tunex.dist.ckpt import save_sharded
        from tunex.dist.env import DistEnv

        random.seed(0)
        torch.manual_seed(0)
        save_sharded(out.parent, 7, lm, opt, {"data": {"micro_batches": 7}}, keep=0, env=DistEnv())

    def config_text(out):
        from tunex.io.atomic import write_text

        write_text(out, "".join(f"key_{i} = {i}\n" for i in range(200_000)))

    # the GGUF cache: `model.gguf` given as a model path converts into $TUNEX_CACHE/gguf/HASH
    from tunex.models.hub import gguf_cache_dir

    os.environ["TUNEX_CACHE"] = str(root / "outs" / "gguf_cache")  # the forked runs inherit it

    def gguf_cache(out):
        from tunex.models.hub import resolve_model_path

        if resolve_model_path(root / "model.gguf") != out:
            raise RuntimeError(f"the GGUF cache is not at {out}")

    def data_cache(out):
        from tunex.config import DataConfig
        from tunex.data import build_dataset
        from tunex.tokenizer import load_tokenizer

        cfg = DataConfig(path=str(root / "cache_data.jsonl"), format="pretrain", template="auto", max_length=64)
        build_dataset(cfg, load_tokenizer(root / "model"), seed=0, cache_dir=str(out))

    def metrics(out):
        from tunex.train.metrics import MetricsWriter, read_metrics

        done = len(read_metrics(out.parent))  # resume after the steps a killed run logged
        writer = MetricsWriter(out.parent, resume_step=done)
        for step in range(done + 1, METRICS_STEPS + 1):
            writer.write({"step": step, "loss": 1.0 / step, "note": "x" * 100})
        writer.close()

    table = {
        "merge": (merge, "merged"),
        "save_sharded": (save_sharded, "sharded"),
        "pth_to_hf_adapter": (pth_to_hf_adapter, "adapter_out"),
        "pth_to_hf_full": (pth_to_hf_full, "full_out"),
        "quantize": (quantize, "quantized"),
        "gguf_to_hf": (gguf_to_hf, "from_gguf"),
        "hf_to_gguf": (hf_to_gguf, "out.gguf"),
        "train_checkpoint": (train_checkpoint, "work/iter_7.pth"),
        "sharded_checkpoint": (sharded_checkpoint, "work/iter_7.shards"),
        "config_text": (config_text, "text/config.toml"),
        "gguf_cache": (gguf_cache, gguf_cache_dir(root / "model.gguf").relative_to(root / "outs" / "gguf_cache")),
        "metrics": (metrics, "work/metrics.jsonl"),
        "data_cache": (data_cache, "cache"),  # the whole cache folder: its store, content memo and lock
    }
    return {name: (root / "outs" / name / rel, fn) for name, (fn, rel) in table.items()}


def first_values(folder: Path) -> dict[str, float]:
    """Tensor name -> its first float32 value, over the shards the index lists (pure Python)."""
    import struct

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    values = {}
    for shard in sorted(set(index["weight_map"].values())):
        with open(folder / shard, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            for key, info in header.items():
                if key != "__metadata__":
                    f.seek(8 + size + info["data_offsets"][0])
                    values[key] = struct.unpack("<f", f.read(4))[0]
    return values


METRICS_STEPS = 20_000


def metrics_view(out: Path) -> dict | None:
    """metrics.jsonl as the steps of its whole lines; a torn or unparsable line is reported."""
    if not out.exists():
        return None
    text = out.read_text()
    if text and not text.endswith("\n"):
        return {"torn": text.rsplit("\n", 1)[-1][:80]}
    try:
        steps = [json.loads(line)["step"] for line in text.splitlines()]
    except (ValueError, KeyError) as e:
        return {"torn": str(e)}
    return {"steps": len(steps)} if steps == list(range(1, len(steps) + 1)) else {"torn": "steps out of order"}


def complete_view(name: str, out: Path):
    """What a reader sees at ``out``: None (nothing written) or a value equal for equal outputs.
    save_sharded lands files in an existing folder: only a folder with an index counts, and its
    tensors must all come from one run (equal values). metrics.jsonl is appended to: any run's
    whole lines, steps 1..N. The data cache: the store folders in it (a lone one, or none)."""
    if name == "metrics":
        return metrics_view(out)
    if name == "data_cache":
        if not out.is_dir():
            return None
        stores = [p for p in out.iterdir() if p.is_dir() and p.name != "content" and ".tunex-" not in p.name]
        return {p.name: digest(p) for p in stores} or None
    if name != "save_sharded":
        return digest(out)
    if not (out / "model.safetensors.index.json").exists():
        return None
    values = first_values(out)
    return {"tensors": sorted(values), "runs": len(set(values.values()))}


def train_kills(root: Path, seed: int, kills: int) -> dict:
    """A LoRA run of 10 steps (a checkpoint every step) killed at a random point, then resumed with
    ``--resume auto`` until done, must log exactly the uninterrupted run's steps."""
    from test_train_helpers import make_data, make_tiny_model, write_config
    from tunex.config import load_config
    from tunex.train import checkpoint
    from tunex.train.loop import train
    from tunex.train.metrics import read_metrics

    model, data = make_tiny_model(root / "tm"), make_data(root / "td", "instruct")
    cfg_path = write_config(
        root / "t.toml", model, data, "lora", "openai", root / "runs" / "ref", max_steps=10, save_steps=1
    )

    def run_train(work: Path, resume: str | None = None):
        def go():
            if resume:  # keep what the run says (its first line names the checkpoint it resumed from)
                work.mkdir(parents=True, exist_ok=True)
                fd = os.open(work.parent / f"{work.name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)  # the progress line and its messages go to stderr
                os.environ["COLUMNS"] = "1000"  # one line each, paths unbroken
            train(load_config(cfg_path), work_dir=str(work), resume=resume)

        return go

    took = run(run_train(root / "runs" / "ref"))
    curve = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(root / "runs" / "ref")]
    rng = random.Random(seed)
    problems, landed = [], 0
    for i in range(kills):
        work = root / "runs" / f"k{i}"
        pid = _child(run_train(work))
        time.sleep(rng.uniform(0.1, 1.0) * took)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        landed += len(read_metrics(work)) < len(curve)
        saved = checkpoint.latest(work)
        run(run_train(work, "auto"))
        said = (work.parent / f"{work.name}.log").read_text()
        if saved is not None and f"resumed from {saved} at step" not in said:
            problems.append(f"kill {i}: the run did not resume from {saved}")
        got = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(work)]
        if got != curve:
            problems.append(f"kill {i}: the resumed run logged {got[:3]}... instead of {curve[:3]}...")
        if partials(work):
            problems.append(f"kill {i}: partials left after the resumed run: {partials(work)}")
    return {"kills": kills, "seconds": round(took, 3), "killed_mid_run": landed, "problems": problems}


def _mount(folder: Path, options: str) -> bool:
    import subprocess

    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _umount(folder: Path) -> None:
    import subprocess

    subprocess.run(["umount", str(folder)], check=True)


def _start(fn, out: Path, limit_size: bool = False) -> tuple[int, int]:
    """Start ``fn(out)`` in a forked child that reports what it raised; (pid, the report's pipe)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        report = {"raised": None}
        try:
            if limit_size:  # no tmpfs to fill: a file-size limit (writes fail with EFBIG)
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
            fn(out)
        except BaseException as e:  # noqa: BLE001 - the report is the point
            report = {"raised": type(e).__name__, "message": str(e), "oserror": isinstance(e, OSError)}
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(report))
        os._exit(0)
    os.close(write)
    return pid, read


def _collect(pid: int, read: int) -> dict:
    """What the child of :func:`_start` raised (type, message, whether an OSError)."""
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {"raised": "the child died", "message": "", "oserror": False}


def _error_of(fn, out: Path, limit_size: bool) -> dict:
    """Run ``fn(out)`` in a forked child; what it raised (type, message, whether an OSError)."""
    return _collect(*_start(fn, out, limit_size))


def race(root: Path, only: set[str]) -> dict:
    """Each writer twice at once into the same new output (after a reference run): what each run
    raised, whether the output is then whole (equal to the reference) and the partials left."""
    report = {}
    for name, (out, fn) in writers(root).items():
        # a run appends only to its own work_dir's metrics.jsonl
        if only and name not in only or name == "metrics":
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        run(lambda: fn(out))
        reference = complete_view(name, out)
        remove(out)
        started = [_start(fn, out) for _ in range(2)]
        results = [_collect(*s) for s in started]
        left = partials(out.parent) + partials_under(out)
        report[name] = {"runs": results, "whole": complete_view(name, out) == reference, "left": left, "out": str(out)}
    return report


def full_and_read_only(root: Path, only: set[str]) -> dict:
    """Each writer into a full filesystem (a 64 KiB tmpfs; a file-size limit where none can be
    mounted) and into a read-only one (a read-only tmpfs; a folder mode 0555 when not root): what
    it raised, and what it left in its output folder. Inputs are hashed before and after."""
    inputs = [root / "model", root / "ck", root / "adapter", root / "model.gguf"]

    def hashes() -> dict:
        return {str(p): digest(p) for p in inputs}

    before = hashes()
    report = {}
    for name, (out, fn) in writers(root).items():
        if only and name not in only or name == "data_cache":  # test_faults.py has its own (root only)
            continue
        for fault in ("full", "read-only"):
            folder = out.parent  # the writer's partials and output land here
            folder.mkdir(parents=True, exist_ok=True)
            how = "tmpfs"
            mounted = _mount(folder, "size=64k" if fault == "full" else "ro,size=64k")
            if not mounted:
                if fault == "read-only" and os.geteuid() == 0:
                    report[f"{name}/{fault}"] = {"skipped": "root without a read-only tmpfs"}
                    continue
                how = "rlimit" if fault == "full" else "mode 0555"
                if fault == "read-only":
                    os.chmod(folder, 0o555)
            try:
                result = _error_of(fn, out, limit_size=fault == "full" and not mounted)
                left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
                if name == "metrics":  # an append log keeps the lines written before the disk filled
                    result["lines"] = metrics_view(out)
            finally:
                if mounted:
                    _umount(folder)
                os.chmod(folder, 0o755)
            report[f"{name}/{fault}"] = {**result, "how": how, "left": left, "out": str(out)}
    report["inputs_unchanged"] = hashes() == before
    return report


def main() -> None:
    root, seed, kills = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    only = set(sys.argv[4:])
    faults, racing = "--full-and-read-only" in only, "--race" in only
    only -= {"--full-and-read-only", "--race"}
    import torch

    torch.set_num_threads(1)
    # imported here so that a forked run starts writing at once (importing starts no threads)
    import gguf  # noqa: F401
    import transformers  # noqa: F401
    import tunex.dist.ckpt  # noqa: F401
    import tunex.gguf_io  # noqa: F401
    import tunex.merge  # noqa: F401
    import tunex.quant.checkpoint  # noqa: F401
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: F401
    from tunex.config import load_config
    from tunex.train.export import checkpoint_as_adapter

    run(lambda: build_inputs(root))

    def make_adapter():
        checkpoint_as_adapter(load_config(root / "lora.toml"), root / "ck" / "iter_1.pth", root / "adapter")

    run(make_adapter)
    if faults:
        print(json.dumps(full_and_read_only(root, only)))
        return
    if racing:
        print(json.dumps(race(root, only)))
        return
    rng = random.Random(seed)
    report = {}
    if not only or "train" in only:
        report["train"] = train_kills(root, seed, max(1, kills // 4))
    for name, (out, fn) in writers(root).items():
        if only and name not in only:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = out.parent
        took = run(lambda: fn(out))
        reference = complete_view(name, out)
        problems, seen = [], {"complete": 0, "absent": 0, "partials_left": 0}
        if reference is None:
            problems.append("the reference run wrote nothing")
        for i in range(kills):
            if i % 2 == 0:  # even kills write a new output, odd ones replace the previous one
                remove(out)
            pid = _child(lambda: fn(out))
            time.sleep(rng.uniform(0, 1.2 * took))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            view = complete_view(name, out)
            if view is None:
                seen["absent"] += 1
            elif view == reference:
                seen["complete"] += 1
            elif name == "metrics" and "torn" not in view:
                seen["whole_lines"] = seen.get("whole_lines", 0) + 1  # appends stopped between lines
            else:
                problems.append(f"kill {i}: a half or mixed output at {out}: {view}")
            left = set(partials(folder)) | set(partials_under(out))
            seen["partials_left"] += bool(left)
        run(lambda: fn(out))
        after = partials(folder) + partials_under(out)
        if after:
            problems.append(f"partials left after the final run: {after}")
        if complete_view(name, out) != reference:
            problems.append("the final run's output differs from the reference")
        report[name] = {"kills": kills, "seconds": round(took, 3), **seen, "problems": problems}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
