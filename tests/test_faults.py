"""Fault injection: SIGKILL during every writer, a full disk, a read-only folder, two writers at once,
a live owner's partial, a torn metrics line. Marked ``faults`` (``pytest -m faults`` runs only these;
the normal suite runs them too)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_train_helpers import make_tiny_model
from tunex.io import atomic

pytestmark = pytest.mark.faults
HERE = Path(__file__).resolve().parent
KILLS = 20


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "python"), str(HERE), env.get("PYTHONPATH", "")])
    return env


def test_sigkill_at_random_points_leaves_every_output_absent_or_whole_and_the_next_run_sweeps(tmp_path):
    """20 seeded kills per writer (fault_kill_harness.py); each output is absent or byte-equal to a
    complete run's (save_sharded: all tensors of one run; metrics.jsonl: whole lines of steps 1..N),
    and a run after the kills leaves no partial."""
    done = subprocess.run(
        [sys.executable, str(HERE / "fault_kill_harness.py"), str(tmp_path), "22", str(KILLS)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {
        "merge",
        "save_sharded",
        "pth_to_hf_adapter",
        "pth_to_hf_full",
        "quantize",
        "gguf_to_hf",
        "hf_to_gguf",
        "train_checkpoint",
        "sharded_checkpoint",
        "config_text",
        "gguf_cache",
        "metrics",
        "data_cache",
        "train",
    }
    train = report.pop("train")  # 5 runs killed at random points, each resumed to the end
    assert train["problems"] == [] and train["kills"] == KILLS // 4 and train["killed_mid_run"] >= 1, train
    for name, r in report.items():
        assert r["problems"] == [], (name, r["problems"])
        # metrics.jsonl is appended to: a kill leaves the whole lines of steps 1..N, never a torn one
        assert r["complete"] + r["absent"] + r.get("whole_lines", 0) == r["kills"] == KILLS, (name, r)
    assert report["metrics"]["whole_lines"] >= 1, report["metrics"]  # some kills landed mid-append
    # the kills do land inside writes: many leave partials for the next run to sweep
    assert sum(r["partials_left"] for r in report.values()) >= KILLS, report


def _owner_name(token_fields: list[str]) -> str:
    return ".out.tunex-partial." + "-".join(token_fields)


def test_a_live_owners_partial_is_left_alone_and_swept_once_it_dies(tmp_path):
    mine = atomic.partial_path(tmp_path / "out")
    mine.mkdir()
    host, boot, _pid, _start, _seq = mine.name.rsplit(".", 1)[1].split("-")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tunex.io import atomic; p = atomic.partial_path(sys.argv[1]); p.mkdir(); "
            "print(p, flush=True); sys.stdin.read()",
            str(tmp_path / "theirs"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        theirs = Path(holder.stdout.readline().strip())
        foreign = tmp_path / _owner_name(["0123456789abcdef", boot, "1", "1", "0"])
        other_boot = tmp_path / _owner_name([host, "0" + boot[1:] if boot[0] != "0" else "1" + boot[1:], "1", "1", "0"])
        foreign.mkdir()
        other_boot.write_bytes(b"x")
        assert atomic.sweep(tmp_path) == [other_boot]
        assert mine.is_dir() and theirs.is_dir() and foreign.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert atomic.sweep(tmp_path) == [theirs]
    assert mine.is_dir() and foreign.is_dir()


def test_two_writers_of_one_new_folder_one_wins_whole_the_other_errors(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic.atomic_folder(target) as first:
            (first / "a").write_text("first")
            with atomic.atomic_folder(target) as second:
                (second / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the loser's partial is removed"


def test_every_writer_run_twice_at_once_into_one_output_leaves_it_whole(tmp_path):
    """Each writer of the kill suite (fault_kill_harness.py --race; not the metrics appends) started
    twice at once into one new output: each run succeeds (replacing the other's output in one step)
    or raises a one-line FileExistsError naming the output (save_sharded, which lands shards in a
    folder one by one, holds a lock on the folder: the second writer is refused), one at least
    succeeds, and the output is then whole (equal to a lone run's) with no partial left."""
    done = subprocess.run(
        [sys.executable, str(HERE / "fault_kill_harness.py"), str(tmp_path), "0", "0", "--race"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 12, sorted(report)
    for name, r in report.items():
        assert r["whole"] and r["left"] == [], (name, r)
        assert any(run["raised"] is None for run in r["runs"]), (name, r["runs"])
        for run in r["runs"]:
            if run["raised"] is not None:
                message = run["message"]
                assert run["raised"] == "FileExistsError", (name, run)
                assert "already exists" in message or "another process is writing" in message, (name, run)
                assert "\n" not in message and r["out"] in message, (name, run)


@pytest.fixture(scope="module")
def merge_inputs():
    """A tiny model, a random PEFT adapter for it, and a reference merge, in a folder every user can
    read (the read-only test runs the writers as an unprivileged user when the tests run as root)."""
    from types import SimpleNamespace

    import torch
    from tunex.merge import merge
    from tunex.models import load_model
    from tunex.peft import apply_lora, export_adapter, trainable_state_dict

    root = Path(tempfile.mkdtemp(prefix="tunex-faults-"))
    os.chmod(root, 0o755)
    model = make_tiny_model(root / "model", tied=False)
    lm = load_model(model)
    method = SimpleNamespace(target_modules="all-linear", r=4, alpha=8, dropout=0.0, use_dora=False, use_rslora=False)
    apply_lora(lm, method.target_modules, method.r, method.alpha)
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) * 0.1 for k, v in trainable_state_dict(lm).items()}
    export_adapter(state, method, root / "adapter", base_model=str(model), dtype=torch.float32)
    merge(model, root / "adapter", root / "reference", device="cpu")
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def _merge_cmd(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tunex", "convert", "merge", str(root / "model"), str(root / "adapter"), str(out)]


def test_two_merges_into_one_new_folder_at_once_one_wins_whole(merge_inputs, tmp_path):
    out = tmp_path / "m"
    procs = [
        subprocess.Popen(
            _merge_cmd(merge_inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code != 0)
    assert "already exists" in loser and len(loser.strip().splitlines()) == 1, loser
    assert _tree(out) == _tree(merge_inputs / "reference")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))


WRITERS = {
    "merge": lambda root, out: _merge_cmd(root, out),
    "hf_to_gguf": lambda root, out: [
        sys.executable,
        "-m",
        "tunex",
        "convert",
        "hf_to_gguf",
        str(root / "model"),
        str(out),
    ],
    "quantize": lambda root, out: [sys.executable, "-m", "tunex", "quantize", str(root / "model"), str(out)],
    "copy-cfg": lambda root, out: [
        sys.executable,
        "-m",
        "tunex",
        "copy-cfg",
        "smollm2_135m_instruct_lora_chatterbot",
        str(out),
    ],
}


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_or_read_only_folder_is_one_line_and_leaves_nothing(merge_inputs, tmp_path, writer, fault):
    before = _tree(merge_inputs)
    folder = merge_inputs / f"dest-{writer}-{fault}"
    folder.mkdir()
    out = folder / {"hf_to_gguf": "out.gguf", "copy-cfg": "c.toml"}.get(writer, "out")
    setup, mounted = _limit_file_size, False
    if fault == "read-only":
        setup = None
        if os.geteuid() != 0:
            os.chmod(folder, 0o555)
        else:  # root ignores folder permissions: a read-only filesystem instead
            mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
            if subprocess.run(mount, capture_output=True).returncode != 0:
                pytest.skip("running as root where a read-only tmpfs cannot be mounted")
            mounted = True
    env = {**_env(), "HOME": str(tmp_path), "TUNEX_CACHE": str(tmp_path / "cache")}
    try:
        done = subprocess.run(
            WRITERS[writer](merge_inputs, out), capture_output=True, text=True, env=env, preexec_fn=setup, timeout=300
        )
        leftovers = [p.name for p in folder.rglob("*")]
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        os.chmod(folder, 0o755)
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    expect = ("Permission denied", "Read-only file system") if fault == "read-only" else ("too large",)
    assert any(e in lines[0] for e in expect), lines[0]
    assert leftovers == [], f"left in the output folder: {leftovers}"
    assert _tree(merge_inputs) == before, "inputs changed"
    shutil.rmtree(folder)


def test_every_writer_on_a_full_or_read_only_filesystem_raises_one_line_naming_it_and_leaves_nothing(tmp_path):
    """All twelve writers of the kill suite (fault_kill_harness.py --full-and-read-only) into a 64
    KiB tmpfs and a read-only tmpfs (as root; else a file-size limit and a folder mode 0555): each
    raises an OSError whose one-line message names its output (not a hidden partial), leaves its
    output folder empty (metrics.jsonl: the whole lines appended before the disk filled) and
    changes no input."""
    done = subprocess.run(
        [sys.executable, str(HERE / "fault_kill_harness.py"), str(tmp_path), "0", "0", "--full-and-read-only"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("inputs_unchanged") is True
    names = {key.split("/")[0] for key in report}
    assert len(names) == 12 and len(report) == 24, sorted(report)
    ran = {key: r for key, r in report.items() if "skipped" not in r}
    assert len(ran) >= 12, report  # the full-disk case runs everywhere
    expect = {
        "full": ("No space left on device", "too large", "a full disk?"),
        "read-only": ("Read-only file system", "Permission denied"),
    }
    for key, r in ran.items():
        fault = key.split("/")[1]
        assert r["oserror"], (key, r)
        message = r["message"]
        assert "\n" not in message and r["out"] in message and ".tunex-" not in message, (key, message)
        assert any(e in message for e in expect[fault]), (key, message)
        if key == "metrics/full":  # the lines before the failed append stay, whole
            assert r["left"] == ["metrics.jsonl"] and r["lines"]["steps"] >= 1, (key, r)
        else:
            assert r["left"] == [], (key, r["left"])


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_said_once(tmp_path):
    from tunex.train.metrics import MetricsWriter, read_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    writer = MetricsWriter(tmp_path, resume_step=2)
    assert writer.notice is not None and "metrics.jsonl:4" in writer.notice and "\n" not in writer.notice
    writer.write({"step": 3, "loss": 0.5})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


def test_sweep_never_fails_a_writer_and_ignores_other_names(tmp_path):
    (tmp_path / ".hidden").write_text("")
    (tmp_path / ".x.tunex-partial-123").mkdir()  # an older tunex's partial: no owner, left alone
    assert atomic.sweep(tmp_path) == []
    assert atomic.sweep(tmp_path / "missing") == []


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """A full fine-tune config for 2 gloo processes (FSDP2: iter_N.shards every step) and the
    uninterrupted run's curve."""
    import torch
    from test_train_helpers import make_data, write_config
    from tunex.train.metrics import read_metrics

    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    root = tmp_path_factory.mktemp("dist_kill")
    model = make_tiny_model(root / "model", tied=False)
    data = make_data(root / "data", "pretrain")
    cfg = write_config(
        root / "full.toml", model, data, "full", "pretrain", root / "unused", save_steps=1, max_steps=4, batch_size=1
    )
    _torchrun_train(cfg, root / "ref")
    return root, cfg, read_metrics(root / "ref")


def _dist_env() -> dict[str, str]:
    env = dict(_env(), OMP_NUM_THREADS="1", TUNEX_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1", COLUMNS="1000")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES", "PORT"):
        env.pop(var, None)
    return env


def _torchrun(script: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script]


def _torchrun_train(cfg: Path, work: Path, *extra: str) -> str:
    args = ["-m", "tunex", "train", str(cfg), "--work-dir", str(work), "-o", "eval.prompts=[]", *extra]
    done = subprocess.run(_torchrun(args), env=_dist_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stderr


@pytest.mark.parametrize(
    "where,step,ranks",
    [("shard", 2, "1"), ("shard", 3, "0,1"), ("publish", 2, "0")],
    ids=["rank1-after-its-shard", "both-after-their-shards", "rank0-before-the-rename"],
)
def test_a_two_process_sharded_checkpoint_killed_mid_save_is_absent_and_resume_continues(
    dist_run, tmp_path, where, step, ranks
):
    """2 gloo processes save iter_N.shards every step; the chosen ranks are SIGKILLed inside the save
    of step STEP (after writing their shard file, or rank 0 just before the folder's one rename):
    the job fails, iter_STEP.shards does not exist, every checkpoint there loads whole, and
    ``--resume auto`` on 2 processes continues from iter_{STEP-1} with the uninterrupted curve and
    sweeps the dead run's partial."""
    import time

    import torch
    from tunex.train import checkpoint
    from tunex.train.metrics import read_metrics

    root, cfg, ref = dist_run
    work, markers = tmp_path / "work", tmp_path / "markers"
    markers.mkdir()
    script = [str(HERE / "fault_dist_pause.py"), str(markers), where, str(step), ranks, "--"]
    args = [str(cfg), "--work-dir", str(work), "-o", "eval.prompts=[]"]  # the script adds `train`
    proc = subprocess.Popen(
        _torchrun([*script, *args]), env=_dist_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        want = [markers / f"rank_{r}.pid" for r in ranks.split(",")]
        deadline = time.monotonic() + 200
        while not all(p.exists() for p in want) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(p.exists() for p in want), "the ranks never reached the pause point"
        for p in want:
            os.kill(int(p.read_text()), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, err[-2000:]
    names = sorted(p.name for p in work.iterdir())
    assert f"iter_{step}.shards" not in names, names
    saved = checkpoint.checkpoints(work)
    assert [s for s, _ in saved] == list(range(max(1, step - 2), step)), names  # save_total_limit = 2
    for s, path in saved:  # every checkpoint that is there is whole
        state = checkpoint.load(path)
        assert state["step"] == s and state["world_size"] == 2 and state["model"], path
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    if "0" in ranks.split(","):  # rank 0 died holding the partial: the next save must sweep it
        assert [p for p in names if ".tunex-partial" in p], names
    # (when only rank 1 dies, rank 0's collective fails and it removes the partial itself)

    said = _torchrun_train(cfg, work, "--resume", "auto")
    assert f"resumed from {work / f'iter_{step - 1}.shards'} at step {step - 1}" in " ".join(said.split()), said
    got = read_metrics(work)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)
    assert [p.name for p in work.iterdir() if ".tunex-" in p.name] == [], "the dead run's partial stayed"


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_the_data_cache_on_a_full_or_read_only_filesystem_is_one_line_and_leaves_no_store(tmp_path, fault):
    """Tokenizing into a cache folder on a 64 KiB tmpfs (or a read-only one): one OSError line naming
    the cache, and no store (complete or partial) left behind; the run without the fault then builds
    it. Needs root and tmpfs mounts."""
    from test_train_helpers import make_tokenizer
    from tunex.config import DataConfig
    from tunex.data import build_dataset
    from tunex.tokenizer import load_tokenizer

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    make_tokenizer(tmp_path / "tok")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 40}) + "\n") * 300)
    cfg = DataConfig(path=str(data), format="pretrain", template="auto", max_length=64, pack_to_max_length=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    options = "size=64k" if fault == "full" else "ro,size=64k"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(cache)], capture_output=True).returncode:
        pytest.skip("no tmpfs mount here")
    try:
        with pytest.raises(OSError) as raised:
            build_dataset(cfg, load_tokenizer(tmp_path / "tok"), seed=0, cache_dir=str(cache))
        left = [p for p in cache.iterdir() if p.is_dir() and p.name != "content"]
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    message = str(raised.value)
    assert "\n" not in message and str(cache) in message, message
    assert ("No space left" if fault == "full" else "Read-only") in message, message
    assert left == [], left  # the content memo and the lock file are no store
    assert len(build_dataset(cfg, load_tokenizer(tmp_path / "tok"), seed=0, cache_dir=str(cache))) > 0
