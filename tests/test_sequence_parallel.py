"""Sequence parallelism (``train.sequence_parallel``, Ulysses all-to-all) on gloo processes started
by torchrun: the loss and the LoRA gradients of packed batches (documents cut by the split, an odd
length the ranks pad) equal one process running the same batches through the plain loss module,
with and without gradient checkpointing, on 2 ranks and on 4 (2 data-parallel groups of 2, or one group of 4 over 2 key/value heads); a
``tunex train`` run with it (LoRA through DDP, a full fine-tune through FSDP2) logs the one-process
curve; bad settings are named errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hf_families import hf_model
from _sp_worker import batch, lora_model
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.config import load_config
from tunex.errors import ConfigError, TunexError

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed"),
    pytest.mark.usefixtures("one_thread"),
]
HERE = Path(__file__).parent
TOL = 1e-5


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TUNEX_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *sys.path])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES", "PORT"):
        env.pop(var, None)
    return env


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    result = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sp") / "model"
    hf_model("llama2", num_key_value_heads=2).save_pretrained(folder)  # 4 heads, 2 kv heads, head dim 16
    return folder


def one_process(folder: Path, groups: int, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The oracle: each data-parallel group's batch through the plain loss module in this process,
    every token weighing the same: each batch's summed token loss over all the batches' target count
    (what a data-parallel run steps with)."""
    from tunex.dist.wrap import LossModule
    from tunex.train.loss import target_tokens

    model = lora_model(folder)
    model.gradient_checkpointing = checkpointing
    step = LossModule(model)
    batches = [batch(g, model.config.vocab_size) for g in range(groups)]
    denom = float(sum(target_tokens(b["labels"]) for b in batches))
    total = 0.0
    for b in batches:
        loss = step(b["input_ids"], b["labels"], b["position_ids"], denom)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def check_equal(result: Path, expected: tuple[float, dict[str, torch.Tensor]]) -> None:
    got = torch.load(result, weights_only=True)
    loss, grads = expected
    assert abs(got["loss"] - loss) <= TOL * abs(loss), (got["loss"], loss)
    assert set(got["grads"]) == set(grads) and len(grads) == 2 * 7 * 2  # A and B of 7 linears, 2 layers
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=TOL, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_two_ranks_equal_one_process(tmp_path, gqa_model, checkpointing):
    out = tmp_path / "sp.pt"
    torchrun(2, str(HERE / "_sp_worker.py"), str(gqa_model), str(out), "2", "1" if checkpointing else "0")
    check_equal(out, one_process(gqa_model, 1, checkpointing))


def test_four_ranks_two_data_parallel_groups_of_two(tmp_path, gqa_model):
    out = tmp_path / "sp.pt"
    torchrun(4, str(HERE / "_sp_worker.py"), str(gqa_model), str(out), "2", "0")
    check_equal(out, one_process(gqa_model, 2, False))


def test_four_ranks_one_sequence_with_fewer_key_value_heads_than_ranks(tmp_path, gqa_model):
    """4 ranks share each sequence, the model has 2 key/value heads: each is repeated for 2 ranks."""
    out = tmp_path / "sp.pt"
    torchrun(4, str(HERE / "_sp_worker.py"), str(gqa_model), str(out), "4", "0")
    check_equal(out, one_process(gqa_model, 1, False))


def test_padding_and_slicing_pieces():
    from tunex.dist.sequence import SequenceGroup, local_targets, pad_to_multiple

    ids = torch.arange(10)[None].repeat(2, 1)
    labels = ids + 100
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6]] * 2)
    ids3, labels3, pos3 = pad_to_multiple(ids, labels, pos, 4)
    assert ids3.shape == (2, 12) and labels3[:, 10:].eq(-100).all() and pos3[0, 10:].tolist() == [0, 1]
    assert pad_to_multiple(ids, labels, None, 4)[2][0].tolist() == [*range(10), 0, 1]
    assert pad_to_multiple(ids, labels, pos, 5) == (ids, labels, pos)  # already a multiple
    parts = [local_targets(labels3, SequenceGroup(4, r, 0, 1)) for r in range(4)]
    assert all(count == 2 * 9 for _, count in parts)  # labels 1..9 of each row are targets
    joined = torch.cat([t for t, _ in parts], dim=1)
    assert joined[:, :9].equal(labels[:, 1:]) and joined[:, 9:].eq(-100).all()


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sptrain")
    model = make_tiny_model(root / "model", tied=False)  # 4 heads, 2 kv heads
    data = make_data(root / "data", "pretrain")
    cfgs = {
        kind: write_config(
            root / f"{kind}.toml",
            model,
            data,
            kind,
            "pretrain",
            root / "unused",
            max_steps=3,
            batch_size=1,
            grad_accum=2,
        )
        for kind in ("lora", "full")
    }
    return root, cfgs["lora"], cfgs["full"]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_tunex_train_with_sequence_parallel_logs_the_one_process_curve(run_setup, kind):
    """LoRA through DDP (gradient checkpointing on), a full fine-tune through FSDP2 (off)."""
    from tunex.train.loop import train
    from tunex.train.metrics import read_metrics

    root, lora, full = run_setup
    cfg = lora if kind == "lora" else full
    options = ["method.dropout=0.0", f"train.gradient_checkpointing={'true' if kind == 'lora' else 'false'}"]
    if kind == "full":
        options.append("train.lr=3e-3")
    train(load_config(cfg, options), work_dir=str(root / f"{kind}_one"))
    result = torchrun(
        2,
        "-m",
        "tunex",
        "train",
        str(cfg),
        "--work-dir",
        str(root / f"{kind}_two"),
        *[x for o in [*options, "train.sequence_parallel=2"] for x in ("-o", o)],
    )
    assert "x 1 groups of 2 processes" in " ".join((result.stdout + result.stderr).split())
    one, two = read_metrics(root / f"{kind}_one"), read_metrics(root / f"{kind}_two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(a[key])), (key, a, b)
        assert a["tokens"] == b["tokens"]


def test_bad_settings_are_named_errors(run_setup, tmp_path):
    from tunex.dist.env import DistEnv
    from tunex.dist.sequence import check_model, plan
    from tunex.models import read_config
    from tunex.tokenizer import load_tokenizer
    from tunex.train.build import preflight

    root, cfg, _ = run_setup
    with pytest.raises(ConfigError, match=r"data.max_length: expected a multiple of train.sequence_parallel = 3"):
        load_config(cfg, ["train.sequence_parallel=3"])
    with pytest.raises(ConfigError, match=r"train.sequence_parallel: expected an integer >= 1"):
        load_config(cfg, ["train.sequence_parallel=0"])
    eight = load_config(cfg, ["train.sequence_parallel=8"])
    with pytest.raises(TunexError, match=r"train.sequence_parallel = 8: expected a divisor of the model's 4 attention"):
        preflight(eight, load_tokenizer(eight.model.path))
    hf_model("llama2", hidden_size=96, num_attention_heads=6, num_key_value_heads=3).save_pretrained(tmp_path / "h")
    with pytest.raises(TunexError, match=r"train.sequence_parallel = 2: .* its 3 key/value heads divide or are"):
        check_model(read_config(tmp_path / "h"), 2)
    check_model(read_config(tmp_path / "h"), 3)  # 6 query heads, 3 key/value heads: 3 ranks fit
    with pytest.raises(TunexError, match=r"train.sequence_parallel = 2: expected a divisor of the number of processes"):
        plan(DistEnv(rank=0, world_size=3), 2)
    with pytest.raises(TunexError, match=r"train.sequence_parallel = 2: expected a divisor of the number of processes"):
        plan(DistEnv(), 2)
    with pytest.raises(ConfigError, match=r"train.router_aux_loss_coef: expected 0 with train.sequence_parallel = 2"):
        load_config(cfg, ["train.sequence_parallel=2", "train.router_aux_loss_coef=0.01"])
    hf = load_config(cfg, ["train.sequence_parallel=2", 'model.backend="transformers"'])
    with pytest.raises(TunexError, match=r"sequence_parallel = 2: llama runs through the transformers backend"):
        preflight(hf, load_tokenizer(hf.model.path))
    hf_model("mistral_window").save_pretrained(tmp_path / "w")
    with pytest.raises(TunexError, match=r"mistral attends in sliding windows"):
        check_model(read_config(tmp_path / "w"), 2)
