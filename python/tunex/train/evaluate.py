"""Held-out evaluation: the mean token loss and perplexity of a model on data it does not train on.

The held-out set is either its own data (``eval.data``, in any training format) or a fraction of
the training data (``eval.split``): whole records are held out, chosen by a fixed seed so every run
of the same data (whatever ``train.seed``) holds out the same records and never trains on them.

``eval_loss`` is the summed cross-entropy of every target token divided by their number (so long
and short samples weigh by their tokens); ``eval_perplexity`` is ``exp(eval_loss)``. Packed
sequences keep their samples apart (position ids restart), so packing does not change the figure.

For a preference objective the held-out items are whole (chosen, rejected) pairs: ``eval_loss``
is the objective's loss over all of them (the mean over pairs; ORPO's NLL over all their chosen
response tokens) and TRL's eval metrics follow (``eval_rewards/accuracies``, ...: means over the
pairs), whatever the batch size or the number of processes.
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
# Metrics a checkpoint can be chosen by, and whether the best is the lowest or the highest.
BEST_METRICS = {
    "eval_loss": "min",
    "eval_perplexity": "min",
    "eval_rewards/accuracies": "max",  # preference objectives only
    "eval_rewards/margins": "max",
}


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


@dataclass
class PreferenceEvalResult:
    """Args: loss (the objective's loss over the pairs), metrics (TRL's names without ``eval_``:
    means over the pairs), pairs (pairs evaluated)."""

    loss: float
    metrics: dict[str, float]
    pairs: int

    def record(self, step: int) -> dict[str, Any]:
        """The metrics.jsonl line of this evaluation (TRL's eval names)."""
        named = {f"eval_{k}": v for k, v in self.metrics.items()}
        return {"step": step, "eval_loss": self.loss, **named, "eval_pairs": self.pairs}

    def line(self, step: int | None = None) -> str:
        return preference_line(self.record(-1 if step is None else step), step is not None)


def preference_line(record: dict[str, Any], with_step: bool = True) -> str:
    """The log line of a preference evaluation's record."""
    where = f"[eval step {record['step']}] " if with_step else ""
    text = (
        f"{where}eval_loss {record['eval_loss']:.4f}  eval_rewards/accuracies {record['eval_rewards/accuracies']:.3f}  "
        f"eval_rewards/margins {record['eval_rewards/margins']:.4f}"
    )
    if "eval_logps/chosen" in record:
        text += f"  eval_logps/chosen {record['eval_logps/chosen']:.2f}  eval_logps/rejected {record['eval_logps/rejected']:.2f}"
    return text + f"  ({record['eval_pairs']:,} pairs)"


def change_line(records: list[dict[str, Any]]) -> str | None:
    """How the held-out figures moved over a run, from metrics.jsonl's ``records`` (the first and the
    last evaluation), e.g. "held-out loss 2.00 -> 1.00, perplexity 7.4 -> 2.7 (step 0 -> step 9,
    1,234 target tokens)"; None with fewer than two evaluations."""
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    if "eval_rewards/accuracies" in last and "eval_rewards/accuracies" in first:  # a preference run
        return (
            f"held-out loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}, reward accuracy "
            f"{first['eval_rewards/accuracies']:.3f} -> {last['eval_rewards/accuracies']:.3f} "
            f"(step {first['step']} -> step {last['step']}, {last.get('eval_pairs', 0):,} pairs)"
        )
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
    Preference data splits whole pairs (chosen and rejected stay together, on one side).

    Raises:
        TunexError: when the split would leave no record on either side.
    """
    from tunex.data.dataset import TokenDataset
    from tunex.data.pack import pack
    from tunex.data.store import PREFERENCE_FORMATS

    store = dataset.store
    pairs = data_cfg.format in PREFERENCE_FORMATS  # items are whole pairs: samples 2k and 2k+1
    n = len(store.lengths) // 2 if pairs else len(store.lengths)
    kept, held = split_indices(n, fraction, "pairs" if pairs else "records")
    pad = dataset.pad_id
    if pairs:
        return _pairs(store, kept, pad), _pairs(store, held, pad)
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


def split_indices(n: int, fraction: float, what: str = "records") -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices of ``n`` items: ``round(fraction * n)`` (at least one) held
    out, chosen by :data:`HOLDOUT_SEED` alone.

    Raises:
        TunexError: when the split would leave no item to train on.
    """
    k = max(1, round(fraction * n))
    if k >= n:
        raise TunexError(
            f"eval.split = {fraction}: the data has {n} {what}, holding out {k} leaves none to train on; "
            "lower eval.split or give eval.data"
        )
    held = np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k]).astype(np.int64)
    return np.setdiff1d(np.arange(n, dtype=np.int64), held), held


def _pairs(store: Any, pairs: np.ndarray, pad_id: int) -> Any:
    """The items of a pair store's ``pairs`` (each: chosen sample 2k, then rejected 2k+1)."""
    from tunex.data.dataset import TokenDataset

    members = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
    starts = np.arange(0, len(members) + 1, 2, dtype=np.int64)
    return TokenDataset(store, members, starts, packed=False, pad_id=pad_id)


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
    """(summed NLL of the batch's target tokens, their number) under ``model`` (a tunex causal LM, or
    a LLaVA model given the batch's ``pixel_values``)."""
    from tunex.train.build import forward_hidden, output_head
    from tunex.train.loss import IGNORE_INDEX, linear_cross_entropy, shifted, softcapped_cross_entropy

    ids = batch["input_ids"].to(device)
    positions = batch.get("position_ids")
    positions = positions.to(device) if positions is not None else None
    pixels = batch.get("pixel_values")  # a LLaVA model's images (tunex.data.multimodal)
    pixels = pixels.to(device) if pixels is not None else None
    hidden = forward_hidden(model, ids, positions, pixels)  # (B, T, H)
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
    objective: Any = None,
) -> EvalResult | PreferenceEvalResult:
    """The held-out loss of ``model`` on every item of ``dataset``.

    The model is put in eval mode (no dropout) and back; no RNG state moves, so a resumed run's
    dropout masks do not depend on when it was evaluated. Under data parallelism (``env``) each
    rank evaluates its share of the batches and the sums are reduced; FSDP-sharded models
    (``sharded``) run every batch on every rank, since each forward gathers shards together.

    Args:
        objective: a :class:`tunex.train.preference.Objective` when ``dataset`` holds preference
            pairs (items carry ``reference`` log-probs when a full fine-tune cached them); None
            for the next-token loss.

    Raises:
        TunexError: when the data has no target token.
    """
    from tunex.data import make_loader
    from tunex.train.build import autocast

    batches = list(make_loader(dataset, batch_size, seed=0, shuffle=False))
    distributed = env is not None and env.enabled
    if distributed and not sharded:
        batches = batches[env.rank :: env.world_size]
    if objective is not None:
        from tunex.train.preference import loss_module

        scorer = loss_module(model, objective)
    was_training = model.training
    model.eval()
    cpu_rng = torch.get_rng_state()
    total = torch.zeros(2 if objective is None else 10, dtype=torch.float64)
    try:
        with torch.no_grad(), autocast(train_dtype, device):
            for batch in batches:
                if objective is None:
                    nll, count = batch_nll(model, batch, device)
                    total += torch.tensor([nll, count], dtype=torch.float64)
                else:
                    total += _pair_sums(scorer, batch, device).cpu()
    finally:
        torch.set_rng_state(cpu_rng)
        model.train(was_training)
    if distributed and not sharded:
        import torch.distributed as dist

        reduced = total.to(device)
        dist.all_reduce(reduced)
        total = reduced.cpu()
    if objective is not None:
        return _preference_result(total, objective)
    nll, tokens = float(total[0]), int(total[1])
    if tokens == 0:
        raise TunexError("held-out evaluation: the eval data has no target token (every label is masked)")
    return EvalResult(loss=nll / tokens, tokens=tokens, sequences=len(dataset))


def _pair_sums(scorer: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    reference = batch.get("reference")
    return scorer.held_out_sums(
        batch["input_ids"].to(device),
        batch["labels"].to(device),
        batch["position_ids"].to(device),
        reference.to(device) if reference is not None else None,
    )


def _preference_result(total: torch.Tensor, objective: Any) -> PreferenceEvalResult:
    from tunex.train.preference import METRICS

    terms, nll, tokens, stats = float(total[0]), float(total[1]), float(total[2]), total[3:]
    pairs = int(stats[-1])
    if pairs == 0:
        raise TunexError("held-out evaluation: the eval data has no pair")
    loss = terms / pairs + (nll / tokens if tokens > 0 else 0.0)
    names = METRICS[:4] if objective.name == "reward" else METRICS  # a reward model has no log-probs
    return PreferenceEvalResult(loss, {name: float(stats[i]) / pairs for i, name in enumerate(names)}, pairs)
