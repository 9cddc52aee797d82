"""Multi-process training on the CPU (gloo, 2 processes started by torchrun) on a tiny random model:
the 2-process loss curve equals the 1-process one with the same global batch, checkpoints resume
across world sizes, and a killed rank fails the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.config import load_config
from tunex.train import checkpoint
from tunex.train.loop import train
from tunex.train.metrics import read_metrics

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed"),
    pytest.mark.usefixtures("one_thread"),
]

# 2 processes x accumulation 2 x batch 1 == 1 process x accumulation 4 x batch 1
TWO = ["-o", "train.grad_accum=2"]
ONE = ["train.grad_accum=4"]
NO_DROPOUT = "method.dropout=0.0"  # per-rank dropout masks differ from a lone run's by design
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model(root / "model", tied=False)
    data = make_data(root / "data", "pretrain")
    cfgs = {
        kind: write_config(
            root / f"{kind}.toml",
            model,
            data,
            kind,
            "pretrain",
            root / f"unused_{kind}",
            save_steps=3,
            max_steps=6,
            batch_size=1,
            grad_accum=2,
            lr=3e-3 if kind == "full" else 2e-2,
        )
        for kind in ("full", "lora", "qlora")
    }
    return root, cfgs


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TUNEX_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES", "PORT"):
        env.pop(var, None)
    return env


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tunex",
        "train",
        *args,
    ]
    result = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def lone(cfg_path: Path, work: Path, **kwargs):
    return train(load_config(cfg_path, [*ONE, NO_DROPOUT]), work_dir=str(work), **kwargs)


def assert_same_curve(a: list[dict], b: list[dict], steps: list[int]) -> None:
    by_a, by_b = {r["step"]: r for r in a}, {r["step"]: r for r in b}
    assert sorted(by_b) == steps, sorted(by_b)
    for s in steps:
        for key in ("loss", "grad_norm", "lr"):
            assert abs(by_a[s][key] - by_b[s][key]) <= TOL * max(1.0, abs(by_a[s][key])), (s, key, by_a[s], by_b[s])
        assert by_a[s]["tokens"] == by_b[s]["tokens"]


def test_full_fsdp_equals_one_process_and_resumes_across_world_sizes(setup):
    root, cfgs = setup
    ref, two, back = root / "full_ref", root / "full_two", root / "full_back"
    lone(cfgs["full"], ref)  # 6 steps, iter_3.pth and iter_6.pth
    # 2 processes (FSDP2) for 3 steps: a sharded checkpoint, each rank's part in its own file
    torchrun(str(cfgs["full"]), "--work-dir", str(two), "--max-steps", "3", *TWO, "-o", NO_DROPOUT)
    sharded = two / "iter_3.shards"
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == ["rank_0.safetensors", "rank_1.safetensors"]
    # ... resumed by one process without a process group: the curve continues as if never split
    lone(cfgs["full"], two, resume=str(sharded))
    assert_same_curve(read_metrics(ref), read_metrics(two), list(range(1, 7)))
    # the other way: a lone run's iter_3.pth resumed by 2 processes
    torchrun(str(cfgs["full"]), "--work-dir", str(back), "--resume", str(ref / "iter_3.pth"), *TWO, "-o", NO_DROPOUT)
    assert_same_curve(read_metrics(ref), read_metrics(back), [4, 5, 6])
    # a sharded checkpoint reads as the same dict as a .pth (what `tunex convert` needs)
    full = checkpoint.load(back / "iter_6.shards")
    want = torch.load(ref / "iter_6.pth", weights_only=True)
    assert full["step"] == 6 and full["method"] == "full" and full["world_size"] == 2
    assert set(full["model"]) == set(want["model"])
    for k, v in want["model"].items():
        torch.testing.assert_close(full["model"][k], v, rtol=1e-4, atol=1e-5)


def test_lora_ddp_equals_one_process_and_resumes_on_one(setup):
    root, cfgs = setup
    ref, two = root / "lora_ref", root / "lora_two"
    lone(cfgs["lora"], ref)
    # through tunex's own launcher: `tunex train CFG --nproc-per-node 2` re-executes under torchrun
    cmd = [
        sys.executable,
        "-m",
        "tunex",
        "train",
        str(cfgs["lora"]),
        "--nproc-per-node",
        "2",
        "--work-dir",
        str(two),
        *TWO,
        "-o",
        NO_DROPOUT,
    ]
    result = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "x 2 processes = global batch 4" in " ".join((result.stdout + result.stderr).split())
    assert_same_curve(read_metrics(ref), read_metrics(two), list(range(1, 7)))
    saved = torch.load(two / "iter_3.pth", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng_ranks"]) == 2
    assert all(".lora_" in k for k in saved["model"])  # adapters only: the frozen base stays out
    # rank 0's replicated checkpoint resumed by one process continues the curve
    again = root / "lora_again"
    lone(cfgs["lora"], again, resume=str(two / "iter_3.pth"))
    assert_same_curve(read_metrics(ref), read_metrics(again), [4, 5, 6])
    # rank 0 alone wrote the run's files
    assert (two / "loss.png").is_file() and len((two / "eval.jsonl").read_text().splitlines()) == 1


def test_qlora_fsdp_equals_one_process_resumes_and_converts(setup):
    """QLoRA sharded by FSDP2 (train.fsdp): the NF4 base and the adapters split over 2 gloo processes
    train the one-process curve and adapters; its iter_N.shards (adapters only) resumes on 2 processes
    and on one, and `pth_to_hf` of it writes the adapter the lone run's .pth converts to."""
    from safetensors.torch import load_file
    from tunex.train.export import convert_checkpoint

    root, cfgs = setup
    cfg = cfgs["qlora"]
    ref, two, again = root / "qlora_ref", root / "qlora_two", root / "qlora_again"
    fsdp = ["-o", "train.fsdp=true", "-o", NO_DROPOUT]
    lone(cfg, ref)  # 6 steps, iter_3.pth and iter_6.pth
    first = torchrun(str(cfg), "--work-dir", str(two), "--max-steps", "3", *TWO, *fsdp)
    said = " ".join((first.stdout + first.stderr).split())
    # every q/k/v/o/gate/up/down base of the 2 layers is split by whole quantization blocks: of the
    # 2 x (32x32 q, o + 16x32 k, v + 64x32 gate, up, down) elements' codes (1/2 byte) and absmax
    # (1 byte per 32-element block), each rank holds half
    elements = 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)
    total = elements // 2 + elements // 32
    want = (
        f"14 of 14 NF4 base layers sharded by quantization blocks (this process holds {total // 2:,} of their {total:,}"
    )
    assert "sharded over 2 processes; " + want in said, said[-2000:]
    sharded = two / "iter_3.shards"
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == ["rank_0.safetensors", "rank_1.safetensors"]
    layout = json.loads((sharded / "manifest.json").read_text())["tensors"]
    weights = {k: v for k, v in layout.items() if k.startswith("/model/")}
    assert weights and all(".lora_" in k for k in weights)  # adapters only: the frozen base stays out
    assert all(v["rows"] is not None and sum(v["rows"]) == v["shape"][0] for v in weights.values())
    # the same 2 processes resume it (RNG streams continue), and one process does too
    torchrun(str(cfg), "--work-dir", str(two), "--resume", str(sharded), *TWO, *fsdp)
    assert_same_curve(read_metrics(ref), read_metrics(two), list(range(1, 7)))
    lone(cfg, again, resume=str(sharded))
    assert_same_curve(read_metrics(ref), read_metrics(again), [4, 5, 6])
    got = checkpoint.load(two / "iter_6.shards")
    want = torch.load(ref / "iter_6.pth", weights_only=True)
    assert got["method"] == "qlora" and got["world_size"] == 2 and set(got["model"]) == set(want["model"])
    for k, v in want["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # pth_to_hf reads the folder as it reads a .pth
    loaded = load_config(cfg)
    convert_checkpoint(loaded, two / "iter_6.shards", root / "qlora_hf_two", fp32=True)
    convert_checkpoint(loaded, ref / "iter_6.pth", root / "qlora_hf_ref", fp32=True)
    a = load_file(root / "qlora_hf_two" / "adapter_model.safetensors")
    b = load_file(root / "qlora_hf_ref" / "adapter_model.safetensors")
    assert set(a) == set(b) and len(a) == 28
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_qlora_fsdp_with_bf16_adapters_follows_the_lone_bf16_curve(setup):
    """bf16 adapters (BF16AdamW: fp32 moments, stochastic rounding) on FSDP2 shards: each rank steps
    its rows, so the rounding noise is drawn per shard and the curve follows the lone bf16 run's
    within bf16 rounding (not bit for bit); the moments are saved as float32 DTensor shards."""
    root, cfgs = setup
    cfg = cfgs["qlora"]
    ref, two = root / "qlora_bf16_ref", root / "qlora_bf16_two"
    bf16 = "train.adapter_dtype=bfloat16"
    train(load_config(cfg, [*ONE, NO_DROPOUT, bf16]), work_dir=str(ref))
    torchrun(str(cfg), "--work-dir", str(two), *TWO, "-o", NO_DROPOUT, "-o", bf16, "-o", "train.fsdp=true")
    a, b = read_metrics(ref), read_metrics(two)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)  # the base model's loss: no update yet
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=0.02), (x, y)
    assert b[-1]["loss"] < 0.7 * b[0]["loss"]
    saved = checkpoint.load(two / "iter_6.shards")
    assert all(v.dtype == torch.bfloat16 for v in saved["model"].values())
    moments = [s["exp_avg"] for s in saved["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_torchrun_world_size_one_is_the_plain_run(setup, monkeypatch):
    root, cfgs = setup
    plain, one = root / "plain", root / "one"
    cfg = [*ONE, NO_DROPOUT, "train.max_steps=2"]
    train(load_config(cfgs["lora"], cfg), work_dir=str(plain))
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(var, value)
    train(load_config(cfgs["lora"], cfg), work_dir=str(one))
    assert not torch.distributed.is_initialized()
    assert [r["loss"] for r in read_metrics(plain)] == [r["loss"] for r in read_metrics(one)]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the rank")
def test_killed_rank_fails_the_job(setup):
    root, cfgs = setup
    work = root / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tunex",
        "train",
        str(cfgs["lora"]),
        "--work-dir",
        str(work),
        "-o",
        "train.max_steps=100000",
        "-o",
        "save.save_steps=100000",
        "-o",
        "eval.prompts=[]",
    ]
    proc = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            if read_metrics(work):  # training is under way on both ranks
                victim = next((p for p in _descendants(proc.pid) if _rank_of(p) == "1"), None)
                if victim is not None:
                    break
            time.sleep(0.5)
        assert victim is not None, "the job did not start training"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.monotonic() - killed_at < 90
        assert "SIGKILL" in err or "exitcode" in err or "Signal 9" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_hung_rank_times_out_instead_of_waiting_forever(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(
        "import time, torch, torch.distributed as dist\n"
        "from tunex.dist.env import init_distributed\n"
        "env = init_distributed()\n"
        "if env.rank == 1:\n"
        "    time.sleep(300)  # alive but never joins the collective\n"
        "dist.all_reduce(torch.ones(1))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    started = time.monotonic()
    result = subprocess.run(
        cmd, env=dict(worker_env(), TUNEX_DIST_TIMEOUT="3"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 100
    assert "rank      : 0" in result.stderr or "local_rank: 0" in result.stderr, result.stderr[-3000:]


# sequences of about one length (unpacked data is batched by length) whose target tokens differ
# several-fold: a long prompt with a one-word answer, or a short prompt with a long answer
LONG = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine."
UNEVEN = [
    (LONG, "Yes."),
    ("Go on.", LONG),
    (LONG + " Where?", "Spain."),
    ("Why?", LONG + " Bees."),
    (LONG + " Who?", "Shakespeare."),
    ("And?", LONG + " Honey."),
    (LONG, "No."),
    ("Well?", LONG),
]
# batch_size x grad_accum x processes = one global batch of 4
SPLITS = {
    "4x1x1": ["train.batch_size=4", "train.grad_accum=1"],
    "1x4x1": ["train.batch_size=1", "train.grad_accum=4"],
    "2x2x1": ["train.batch_size=2", "train.grad_accum=2"],
}
TWO_PROCESS_SPLITS = {
    "1x2x2": ["train.batch_size=1", "train.grad_accum=2"],
    "2x1x2": ["train.batch_size=2", "train.grad_accum=1"],
}


def test_loss_is_token_weighted_across_splits(setup, tmp_path):
    """One global batch of 4 split as batch_size x grad_accum x processes = 4x1x1, 1x4x1, 2x2x1, and
    on 2 gloo processes 1x2x2 and 2x1x2, on chat data whose sequences hold very different numbers of
    target tokens: the same sequences (tunex.dist.sampler), so the same losses and gradient norms at
    every step, and the same adapter weights after 4 steps (to 1/2000 of an Adam step). The first
    step's loss (B = 0: the base model's) equals transformers' mean token loss over the 4 sequences."""
    import transformers
    from tunex.data import build_dataset
    from tunex.dist.sampler import rank_micro_batches
    from tunex.tokenizer import load_tokenizer
    from tunex.train.loss import target_tokens

    root, _ = setup
    model = root / "model"
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in UNEVEN]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(
        tmp_path / "c.toml", model, data, "lora", "openai", tmp_path / "unused", save_steps=4, max_steps=4, lr=2e-2
    )
    common = [NO_DROPOUT, "eval.prompts=[]"]
    works = {name: tmp_path / name for name in [*SPLITS, *TWO_PROCESS_SPLITS]}
    for name, split in SPLITS.items():
        train(load_config(cfg, [*split, *common]), work_dir=str(works[name]))
    for name, split in TWO_PROCESS_SPLITS.items():
        torchrun(str(cfg), "--work-dir", str(works[name]), *[a for o in [*split, *common] for a in ("-o", o)])

    # the first step's four sequences, one per micro-batch: deliberately unequal target counts
    loaded = load_config(cfg, SPLITS["4x1x1"])
    dataset = build_dataset(loaded.data, load_tokenizer(model), seed=0, cache_dir=str(tmp_path / "cache"))
    (batch,) = [next(rank_micro_batches(dataset, 4, seed=0, consumed=0))]
    counts = [target_tokens(batch["labels"][i : i + 1]) for i in range(4)]
    assert max(counts) >= 3 * min(counts), counts  # a mean of micro-batch means would weigh them unequally
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    with torch.no_grad():
        want = float(hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss)

    curves = {name: read_metrics(work) for name, work in works.items()}
    assert abs(curves["4x1x1"][0]["loss"] - want) <= 1e-5 * want, (curves["4x1x1"][0]["loss"], want)
    others = [name for name in works if name != "4x1x1"]
    for name in others:
        assert [r["step"] for r in curves[name]] == [1, 2, 3, 4]
        for a, b in zip(curves["4x1x1"], curves[name]):
            for key in ("loss", "grad_norm"):
                assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(a[key])), (name, key, a, b)
    ref = torch.load(works["4x1x1"] / "iter_4.pth", weights_only=True)["model"]
    # the weights after 4 AdamW steps, for every split. Adam divides by the root of its second
    # moment, so an element whose gradient is near zero turns float rounding (products grouped by
    # another micro-batch size) into a visible step: one LoRA A element moved 3.8e-6 here while
    # every loss and gradient norm matched. atol 1e-5 is 1/2000 of one step at lr 2e-2.
    for name in ("1x4x1", "1x2x2", "2x2x1", "2x1x2"):
        got = torch.load(works[name] / "iter_4.pth", weights_only=True)["model"]
        assert set(got) == set(ref)
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
