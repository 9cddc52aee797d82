"""Held-out evaluation: the mean token loss and perplexity of a model on data it does not train on.

The held-out set is either its own data (``eval.data``, in any training format) or a fraction of
the training data (``eval.split``): whole records are held out, chosen by a fixed seed so every run
of the same data (whatever ``train.seed``) holds out the same records and never trains on them.

``eval_loss`` is the summed cross-entropy of every target token divided by their number (so long
and short samples weigh by their tokens); ``eval_perplexity`` is ``exp(eval_loss)``. Packed
sequences keep their samples apart (position ids restart), so packing does not change the figure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tunex.errors import TunexError

# The held-out records of ``eval.split`` depend on this seed only, not on ``train.seed``: runs with
# different seeds are then compared on the same held-out records.
HOLDOUT_SEED = 0xE7A1
# Metrics a checkpoint can be chosen by, and whether lower is better.
BEST_METRICS = {"eval_loss": "min", "eval_perplexity": "min"}


@dataclass
class EvalResult:
    """Args: loss (mean target-token NLL), tokens (target tokens), sequences (items evaluated)."""

    loss: float
    tokens: int
    sequences: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def record(self, step: int) -> dict[str, Any]:
        """The metrics.jsonl line of this evaluation."""
        return {"step": step, "eval_loss": self.loss, "eval_perplexity": self.perplexity, "eval_tokens": self.tokens}

    def line(self, step: int | None = None) -> str:
        where = f"[eval step {step}] " if step is not None else ""
        return (
            f"{where}eval_loss {self.loss:.4f}  eval_perplexity {self.perplexity:.3f}  "
            f"({self.tokens:,} target tokens in {self.sequences:,} sequences)"
        )


def change_line(records: list[dict[str, Any]]) -> str | None:
    """How the held-out figures moved over a run, from metrics.jsonl's ``records`` (the first and the
    last evaluation), e.g. "held-out loss 2.00 -> 1.00, perplexity 7.4 -> 2.7 (step 0 -> step 9,
    1,234 target tokens)"; None with fewer than two evaluations."""
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    tokens = f", {last['eval_tokens']:,} target tokens" if isinstance(last.get("eval_tokens"), int) else ""
    return (
        f"held-out loss {first['eval_loss']:.2f} -> {last['eval_loss']:.2f}, perplexity "
        f"{_perplexity(first):.1f} -> {_perplexity(last):.1f} "
        f"(step {first['step']} -> step {last['step']}{tokens})"
    )


def _perplexity(record: dict[str, Any]) -> float:
    return EvalResult(float(record["eval_loss"]), 0, 0).perplexity


def eval_data_config(cfg: Any) -> Any:
    """The DataConfig of ``eval.data``: the training data's settings with the eval files and format
    (no shuffling: the order does not change the figure)."""
    return dataclasses.replace(
        cfg.data, path=cfg.eval.data, format=cfg.eval.format or cfg.data.format, shuffle_before_pack=False
    )


def hold_out(dataset: Any, data_cfg: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split a built dataset's records into (training, held-out) datasets.

    ``round(fraction * records)`` records (at least one) are held out; the rest are packed (or not)
    as ``data_cfg`` says, shuffled with the training ``seed`` as :func:`tunex.data.build_dataset` does.

    Raises:
        TunexError: when the split would leave no record on either side.
    """
    from tunex.data.dataset import TokenDataset
    from tunex.data.pack import pack

    store = dataset.store
    n = len(store.lengths)
    k = max(1, round(fraction * n))
    if k >= n:
        raise TunexError(
            f"eval.split = {fraction}: the data has {n} records, holding out {k} leaves none to train on; "
            "lower eval.split or give eval.data"
        )
    held = np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k]).astype(np.int64)
    kept = np.setdiff1d(np.arange(n, dtype=np.int64), held)
    pad = dataset.pad_id
    if data_cfg.pack_to_max_length:
        order = None
        if data_cfg.shuffle_before_pack:
            order = np.random.default_rng([seed, 0x5EED]).permutation(len(kept))
        members, starts = pack(store.lengths[kept], data_cfg.max_length, order)
        train = TokenDataset(store, kept[members], starts, packed=True, pad_id=pad)
        members, starts = pack(store.lengths[held], data_cfg.max_length)
        test = TokenDataset(store, held[members], starts, packed=True, pad_id=pad)
    else:
        train = TokenDataset(store, kept, np.arange(len(kept) + 1, dtype=np.int64), packed=False, pad_id=pad)
        test = TokenDataset(store, held, np.arange(len(held) + 1, dtype=np.int64), packed=False, pad_id=pad)
    return train, test


def build_eval_set(cfg: Any, tokenizer: Any, dataset: Any, cache_dir: str | None) -> tuple[Any, Any | None]:
    """(training dataset, held-out dataset or None) as ``cfg.eval`` says."""
    if cfg.eval.data:
        from tunex.data import build_dataset

        held = build_dataset(eval_data_config(cfg), tokenizer, seed=cfg.train.seed, cache_dir=cache_dir)
        if len(held) == 0:
            raise TunexError(f"eval.data {cfg.eval.data!r}: no sample left after tokenization")
        return dataset, held
    if cfg.eval.split > 0:
        return hold_out(dataset, cfg.data, cfg.eval.split, cfg.train.seed)
    return dataset, None


def batch_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, int]:
    """(summed NLL of the batch's target tokens, their number) under ``model`` (a tunex causal LM)."""
    from tunex.train.build import forward_hidden, output_head
    from tunex.train.loss import IGNORE_INDEX, linear_cross_entropy, shifted, softcapped_cross_entropy

    ids = batch["input_ids"].to(device)
    positions = batch.get("position_ids")
    positions = positions.to(device) if positions is not None else None
    hidden = forward_hidden(model, ids, positions)  # (B, T, H)
    weight, bias = output_head(model)
    h, y = shifted(hidden, batch["labels"].to(device))
    count = int((y != IGNORE_INDEX).sum())
    if count == 0:
        return 0.0, 0
    cap = getattr(model, "logit_softcap", None)
    if cap:
        return float(softcapped_cross_entropy(h, weight, y, bias, cap)) * count, count
    return float(linear_cross_entropy(h, weight, y, bias, denom=1.0)), count


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    device: torch.device,
    train_dtype: str = "float32",
    env: Any = None,
    sharded: bool = False,
) -> EvalResult:
    """The held-out loss of ``model`` on every item of ``dataset``.

    The model is put in eval mode (no dropout) and back; no RNG state moves, so a resumed run's
    dropout masks do not depend on when it was evaluated. Under data parallelism (``env``) each
    rank evaluates its share of the batches and the sums are reduced; FSDP-sharded models
    (``sharded``) run every batch on every rank, since each forward gathers shards together.

    Raises:
        TunexError: when the data has no target token.
    """
    from tunex.data import make_loader
    from tunex.train.build import autocast

    batches = list(make_loader(dataset, batch_size, seed=0, shuffle=False))
    distributed = env is not None and env.enabled
    if distributed and not sharded:
        batches = batches[env.rank :: env.world_size]
    was_training = model.training
    model.eval()
    cpu_rng = torch.get_rng_state()
    total = torch.zeros(2, dtype=torch.float64)
    try:
        with torch.no_grad(), autocast(train_dtype, device):
            for batch in batches:
                nll, count = batch_nll(model, batch, device)
                total += torch.tensor([nll, count], dtype=torch.float64)
    finally:
        torch.set_rng_state(cpu_rng)
        model.train(was_training)
    if distributed and not sharded:
        import torch.distributed as dist

        reduced = total.to(device)
        dist.all_reduce(reduced)
        total = reduced.cpu()
    nll, tokens = float(total[0]), int(total[1])
    if tokens == 0:
        raise TunexError("held-out evaluation: the eval data has no target token (every label is masked)")
    return EvalResult(loss=nll / tokens, tokens=tokens, sequences=len(dataset))
