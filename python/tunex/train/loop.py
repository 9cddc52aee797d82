"""The training loop behind ``tunex train``: full, LoRA and QLoRA from one config.

One optimizer step = ``grad_accum`` micro-batches; each micro-batch's mean token loss is divided by
``grad_accum`` before backward. A step is logged to metrics.jsonl, checkpointed every
``save_steps`` (and at the end), and the eval hook answers its prompts every ``every_n_steps``.
A run stopped after step k and resumed from ``iter_k.pth`` sees the same batches, dropout masks
and optimizer state as the uninterrupted run, so its metrics are the same.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from tunex.errors import TunexError
from tunex.train import checkpoint
from tunex.train.build import (autocast, build_model, distributed_rank, enable_gradient_checkpointing,
                               forward_hidden, output_head, pick_device)
from tunex.train.hooks import EvalChatHook
from tunex.train.loss import linear_cross_entropy, shifted
from tunex.train.metrics import MetricsWriter, plot_loss
from tunex.train.optim import build_optimizer, build_scheduler
from tunex.train.progress import TrainProgress


class TrainingDiverged(TunexError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    checkpoint: Path | None
    work_dir: Path
    is_main: bool


def resolve_work_dir(cfg: Any, work_dir: str | None) -> Path:
    return Path(work_dir or cfg.save.work_dir or Path("work_dirs") / cfg.name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def trainable_state(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: everything for a full fine-tune, else the adapters."""
    if kind == "full":
        return {k: v for k, v in model.state_dict().items()}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise TunexError(f"{source}: does not fit this config's model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); resume with the config that wrote it")
    model.load_state_dict(state, strict=False)


def _batches(dataset: Any, cfg: Any, consumed: int, per_epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches from position ``consumed`` on, epoch after epoch (each epoch reshuffled)."""
    from tunex.data import make_loader

    epoch, start = divmod(consumed, per_epoch)
    while True:
        loader = make_loader(dataset, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch,
                             shuffle=True, start_batch=start)
        yield from loader
        epoch, start = epoch + 1, 0


def _micro_step(model, batch, device, cfg, accum: int) -> tuple[torch.Tensor, int]:
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    positions = batch.get("position_ids")
    positions = positions.to(device) if positions is not None else None
    with autocast(cfg.train.dtype, device):
        hidden = forward_hidden(model, input_ids, positions)
        weight, bias = output_head(model)
        h, y = shifted(hidden, labels)
        loss = linear_cross_entropy(h, weight, y, bias)
    (loss / accum).backward()
    return loss.detach(), int(input_ids.numel())


def train(cfg: Any, work_dir: str | None = None, seed: int | None = None, resume: str | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Run training as ``cfg`` says.

    Args:
        cfg: a validated :class:`tunex.config.Config`.
        work_dir: output folder (default ``cfg.save.work_dir``, else ``work_dirs/<config name>``).
        seed: overrides ``cfg.train.seed``.
        resume: None, ``"auto"`` (newest checkpoint in work_dir, if any) or a checkpoint path.
        stop_after: stop after this optimizer step (the schedule still plans the whole run).

    Raises:
        TrainingDiverged: when the loss is NaN/inf; the last good checkpoint stays.
    """
    from tunex.data import build_dataset
    from tunex.models import resolve_model_path
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    rank, local_rank, _ = distributed_rank()
    is_main = rank == 0
    if seed is not None:
        cfg.train.seed = seed
    device = pick_device(local_rank)
    work = resolve_work_dir(cfg, work_dir)
    resume_from = checkpoint.resolve_resume(resume, work)
    state = checkpoint.load(resume_from) if resume_from else None
    seed_everything(cfg.train.seed)

    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    # The tokenized-data cache sits next to the work dirs, so runs of one config share it.
    cache = cfg.data.cache_dir or str(work.parent / ".cache")
    dataset = build_dataset(cfg.data, tokenizer, seed=cfg.train.seed, cache_dir=cache)
    per_epoch = _batches_per_epoch(dataset, cfg)
    accum = cfg.train.grad_accum
    total = cfg.train.max_steps or cfg.train.epochs * math.ceil(per_epoch / accum)
    last = min(total, stop_after) if stop_after else total

    model = build_model(cfg, device)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, total, cfg.train.warmup_ratio, cfg.train.scheduler)

    step, consumed = 0, 0
    if state is not None:
        load_trainable(model, state["model"], resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, consumed = int(state["step"]), int(state["data"]["micro_batches"])

    if is_main:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    metrics = MetricsWriter(work, resume_step=step, enabled=is_main)
    progress = TrainProgress(total, step, enabled=is_main)
    template = get_template(cfg.data.template, tokenizer, system=cfg.data.system)
    hook = EvalChatHook(model, tokenizer, template, cfg.eval, work if is_main else None, progress.echo)
    if is_main:
        trainable = sum(p.numel() for p in params)
        progress.echo(f"{cfg.method.kind}: {trainable:,} trainable parameters; {total} steps of "
                      f"{accum} x {cfg.train.batch_size} sequences; work dir {work}"
                      + (f"; resumed from {resume_from} at step {step}" if state else ""))

    saved: Path | None = resume_from
    loss_value = float("nan")
    batches = _batches(dataset, cfg, consumed, per_epoch)
    model.train()
    try:
        while step < last:
            step += 1
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum = torch.zeros((), device=device)
            tokens = 0
            for _ in range(accum):
                loss, n = _micro_step(model, next(batches), device, cfg, accum)
                loss_sum += loss
                tokens += n
            loss_value = float(loss_sum) / accum
            if not math.isfinite(loss_value):
                where = f"the last good checkpoint is {saved}" if saved else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; stopped before applying it ({where}). "
                    "Lower train.lr or raise train.warmup_ratio, then --resume auto")
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.train.max_norm) if cfg.train.max_norm > 0
                         else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            consumed += accum
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                      "epoch": consumed / per_epoch, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                      "time_s": elapsed}
            metrics.write(record)
            progress.update(record, total, log=step % cfg.train.log_steps == 0 or step == last)
            if step % cfg.save.save_steps == 0 or step == last:
                if is_main:
                    saved = checkpoint.save(work, step, {
                        "model": trainable_state(model, cfg.method.kind),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": checkpoint.rng_state(), "data": {"micro_batches": consumed},
                        "config": cfg.to_dict(), "method": cfg.method.kind}, cfg.save.save_total_limit)
            if hook.due(step, total) or (step == last and cfg.eval.prompts):
                hook(step)
    finally:
        progress.close()
        metrics.close()
    if is_main:
        try:
            plot_loss(work)
        except FileNotFoundError:
            pass
    return TrainResult(steps=step, last_loss=loss_value, checkpoint=saved, work_dir=work, is_main=is_main)


def _batches_per_epoch(dataset: Any, cfg: Any) -> int:
    from tunex.data import make_loader

    n = len(make_loader(dataset, cfg.train.batch_size, seed=cfg.train.seed, shuffle=True))
    if n == 0:
        raise TunexError(f"data.path {cfg.data.path!r}: the dataset is empty after tokenization")
    return n
