"""The training loop behind ``tunex train``: full, LoRA and QLoRA from one config.

One optimizer step = ``grad_accum`` micro-batches on each rank. The step's loss is the mean token
loss over the whole global batch: each micro-batch's summed token loss is divided by the number of
target tokens of all ranks' micro-batches of the step (counted before the first forward), so any
split of a global batch gives the same loss and gradients, however unequally its micro-batches are
filled (docs/TRAINING.md). A step is logged to metrics.jsonl, checkpointed every ``save_steps`` (and
at the end), and the eval hook answers its prompts every ``every_n_steps``, when the held-out loss
(tunex.train.evaluate) is measured too; with ``eval.at_start`` both also run before the first step.
A run stopped after step k and resumed from ``iter_k.pth`` sees the same batches, dropout masks
and optimizer state as the uninterrupted run, so its metrics are the same.

Under torchrun the same loop runs on every rank (tunex.dist): each rank trains on its slice of
every global batch through DDP (adapters) or FSDP2 (full fine-tune); with ``train.sequence_parallel``
groups of ranks share each micro-batch (tunex.dist.sequence); docs/SCALING.md.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunex.dist import ckpt as dist_ckpt
from tunex.dist.env import barrier, init_distributed, rank_seed, seed_all
from tunex.dist.metrics import reduce_step, step_targets
from tunex.dist.sampler import global_batch, rank_micro_batches, steps_per_epoch
from tunex.dist.sequence import plan as plan_sequence
from tunex.dist.wrap import (
    after_eval,
    clip_gradients,
    gradient_sync,
    is_sharded,
    nf4_layers,
    strategy,
    wrap_for_training,
)
from tunex.errors import TunexError
from tunex.io.atomic import write_text
from tunex.train import checkpoint, preference, reference
from tunex.train.best import BestCheckpoint
from tunex.train.build import autocast, build_model, enable_gradient_checkpointing, pick_device, preflight
from tunex.train.evaluate import build_eval_set, evaluate, preference_line
from tunex.train.hooks import EvalChatHook
from tunex.train.metrics import MetricsWriter
from tunex.train.multimodal import build_image_datasets, is_multimodal
from tunex.train.optim import build_optimizer, build_scheduler
from tunex.train.plot import plot_loss
from tunex.train.progress import StartupLog, TrainProgress, plural


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
    if kind == "full" and not hasattr(model, "vision_tower"):  # LLaVA: the trained part only, never the tower
        return {k: v for k, v in model.state_dict().items()}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise TunexError(
            f"{source}: does not fit this config's model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the config that wrote it"
        )
    model.load_state_dict(state, strict=False)


def _batches(dataset: Any, cfg: Any, consumed: int, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from sequence ``consumed`` of the run's stream on, epoch after
    epoch (each epoch reshuffled; the order depends on the global batch only)."""
    t = cfg.train
    return rank_micro_batches(dataset, t.batch_size, t.seed, consumed, rank, world, t.grad_accum)


def grad_scaler(cfg: Any, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 autocast needs loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
    if device.type == "cuda" and cfg.train.dtype == "float16":
        return torch.amp.GradScaler("cuda")
    return None


def _micro_step(
    step_module,
    batch,
    device,
    cfg,
    grad_scale: float,
    last: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    denom: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one micro-batch through the loss module (DDP/FSDP-wrapped or not);
    gradients are reduced across ranks only on the step's ``last`` micro-batch.

    The loss is the micro-batch's summed token loss over ``denom`` (None: its own target tokens);
    backward runs on it times ``grad_scale``. Returns (the loss, the micro-batch's tokens)."""
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    positions = batch.get("position_ids")
    positions = positions.to(device) if positions is not None else None
    images = {"pixel_values": batch["pixel_values"].to(device)} if "pixel_values" in batch else {}  # LLaVA
    with gradient_sync(step_module, last):
        with autocast(cfg.train.dtype, device):
            loss = step_module(input_ids, labels, positions, denom, **images)
        scaled = loss * grad_scale if grad_scale != 1 else loss
        (scaled if scaler is None else scaler.scale(scaled)).backward()
    return loss.detach(), int(input_ids.numel())


def train(
    cfg: Any,
    work_dir: str | None = None,
    seed: int | None = None,
    resume: str | None = None,
    stop_after: int | None = None,
) -> TrainResult:
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

    env = init_distributed()  # a lone process (WORLD_SIZE unset or 1) joins no process group
    is_main = env.is_main
    # sequence parallelism: groups of ranks share each micro-batch; data parallel over the groups
    sequence = plan_sequence(env, cfg.train.sequence_parallel, cfg.source) if cfg.train.sequence_parallel > 1 else None
    dp_rank, world = (sequence.dp_rank, sequence.dp_size) if sequence else (env.rank, env.world_size)
    if seed is not None:
        cfg.train.seed = seed
    device = pick_device(env.local_rank)
    work = resolve_work_dir(cfg, work_dir)
    # rank 0 picks the checkpoint (--resume auto), so every rank resumes from the same one
    resume_from = dist_ckpt.share_path(env, checkpoint.resolve_resume(resume, work) if is_main else None)
    if resume_from is None:
        state = None
    else:  # a sharded folder's tensors are read into the sharded model later, shard by shard
        state = dist_ckpt.read_meta(resume_from) if resume_from.is_dir() else checkpoint.load(resume_from)
    seed_everything(cfg.train.seed)

    startup = StartupLog(is_main)  # what happens before the first step, as it happens
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    preflight(cfg, tokenizer)  # bad model, tokenizer or targets: an error before anything is written
    # The tokenized-data cache sits next to the work dirs, so runs of one config share it.
    cache = cfg.data.cache_dir or str(work.parent / ".cache")
    # one process per node tokenizes into the cache first (its writes are atomic renames, so
    # nodes sharing a file system may race safely); the node's other ranks then read the cache
    if env.local_rank != 0:
        barrier(env)
    if is_multimodal(cfg):  # images: read, checked and tokenized in memory (tunex.data.multimodal)
        dataset, held_out = build_image_datasets(cfg, tokenizer)  # eval.data, or eval.split of the samples
    else:
        paths = [cfg.data.path] if isinstance(cfg.data.path, str) else list(cfg.data.path)
        startup.echo(
            f"reading {plural(len(paths), 'data path')} ({cfg.data.format}); tokenized data is cached in {cache}"
        )
        with startup.tokenizing() as shown:
            dataset = build_dataset(cfg.data, tokenizer, seed=cfg.train.seed, cache_dir=cache, progress=shown)
        dataset, held_out = build_eval_set(cfg, tokenizer, dataset, cache)  # eval.data, or eval.split of the data
    if env.local_rank == 0:
        barrier(env)
    if "sequences" in getattr(dataset, "stats", {}):  # tokenized text (an image dataset's stats differ)
        unit = "sequence" if cfg.train.objective == "sft" else "pair"
        held = f"; {plural(len(held_out), unit)} held out for eval" if held_out is not None else ""
        startup.echo(describe_data(dataset.stats, cfg.data.max_length) + held)
    per_epoch = _batches_per_epoch(dataset, cfg)
    accum = cfg.train.grad_accum
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(per_epoch, accum, world)
    last = min(total, stop_after) if stop_after else total

    # FSDP2 takes the model from the CPU layer by layer: no rank ever holds all of it on its GPU
    on_cpu = (
        torch.device("cpu") if strategy(cfg.method.kind, env, cfg.train.fsdp, is_multimodal(cfg)) == "fsdp" else None
    )
    startup.echo(f"loading the model {cfg.model.path} ({cfg.model.dtype}) on {device}")
    model = build_model(cfg, device, load_device=on_cpu)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=cfg.train.offload_checkpoints)
    # alone: the loss module; adapters: DDP over the trainable part (train.fsdp: FSDP2); full: FSDP2 shards
    objective = preference.Objective.of(cfg)  # None for sft
    if objective is not None and objective.name == "reward":  # a new trainable head, before wrapping
        adapter = torch.bfloat16 if cfg.train.adapter_dtype == "bfloat16" else torch.float32
        preference.add_reward_head(model, None if cfg.method.kind == "full" else adapter)
    make_loss = None if objective is None else (lambda lm: preference.loss_module(lm, objective))
    step_module = wrap_for_training(
        model, cfg.method.kind, env, device, cfg.train.dtype, make_loss, sequence, fsdp=cfg.train.fsdp
    )
    pref_steps = None if objective is None else preference.PreferenceSteps(objective)
    if objective is not None and objective.reference and cfg.method.kind == "full":
        # the starting model's log-probs, before any checkpoint is loaded into it (cached on disk)
        dataset = reference.with_reference(dataset, model, cfg, device, env)
        if held_out is not None:  # eval.split: the same store's file, read back; eval.data: its own
            held_out = reference.with_reference(held_out, model, cfg, device, env)
        after_eval(step_module)  # FSDP2: reshard what the pass without backward left gathered
    sharded = is_sharded(step_module)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP2's shards
    bf16 = cfg.method.kind != "full" and cfg.train.adapter_dtype == "bfloat16"
    optimizer = build_optimizer(
        params,
        cfg.train.lr,
        cfg.train.betas,
        cfg.train.weight_decay,
        bf16_adapters=bf16,
        kind=cfg.train.optimizer,
        seed=cfg.train.seed,  # the same bf16 rounding on every rank (dropout is seeded per rank)
    )
    scheduler = build_scheduler(optimizer, total, cfg.train.warmup_ratio, cfg.train.scheduler)
    scaler = grad_scaler(cfg, device)

    step, consumed = 0, 0
    if state is not None:
        if sharded or resume_from.is_dir():
            dist_ckpt.restore(resume_from, None if resume_from.is_dir() else state, model, optimizer, cfg.method.kind)
        else:
            load_trainable(model, state["model"], resume_from)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, consumed = int(state["step"]), _sequences(state["data"], cfg.train.batch_size)
        dist_ckpt.restore_rng(state, env, cfg.train.seed, step)
    elif env.rank > 0:  # own dropout masks per rank; rank 0 keeps the lone run's stream
        seed_all(rank_seed(cfg.train.seed, env.rank))

    if is_main:
        work.mkdir(parents=True, exist_ok=True)
        write_text(work / "config.toml", cfg.to_toml())
    from tunex.track import open_trackers

    trackers = open_trackers(cfg, work, resumed=state is not None, enabled=is_main)
    metrics = MetricsWriter(work, resume_step=step, enabled=is_main, trackers=trackers)
    best = BestCheckpoint(work, cfg.save.best_metric, enabled=is_main)
    progress = TrainProgress(total, step, enabled=is_main)
    if metrics.notice:
        progress.echo(metrics.notice)
    template = get_template(cfg.data.template, tokenizer, system=cfg.data.system)
    hook = EvalChatHook(model, tokenizer, template, cfg.eval, work if is_main else None, progress.echo)
    if is_main:
        trainable = sum(p.numel() for p in params)
        model_cfg = getattr(model, "config", None)  # which backend runs the model (model.backend)
        if model_cfg is not None:
            progress.echo(f"model: {model_cfg.family} on the {getattr(model_cfg, 'backend', 'tunex')} backend")
        progress.echo(
            f"{cfg.method.kind}: {trainable:,} trainable parameters; {total} steps of "
            f"{accum} x {cfg.train.batch_size} sequences x "
            + (
                f"{world} groups of {sequence.size} processes (each sequence split over a group)"
                if sequence
                else plural(world, "process", "processes")
            )
            + f" = global batch {global_batch(cfg.train.batch_size, accum, world)}; work dir {work}"
            + (f"; resumed from {resume_from} at step {step}" if state else "")
        )
        if sharded and cfg.method.kind != "full":  # train.fsdp
            done, layers, mine, every = nf4_layers(model)
            nf4 = (
                f"; {done} of {layers} NF4 base layers sharded by quantization blocks (this process holds "
                f"{mine:,} of their {every:,} bytes of codes and absmax)"
                if layers
                else ""
            )
            progress.echo(f"FSDP2: the frozen base and the adapters are sharded over {env.world_size} processes{nf4}")

    saved: Path | None = resume_from
    loss_value = float("nan")
    batches = _batches(dataset, cfg, consumed, dp_rank, world)
    model.train()
    try:
        if cfg.eval.at_start and step == 0:  # the starting model's figures: the baseline (no checkpoint, not a best)
            if held_out is not None:
                size = cfg.eval.batch_size or cfg.train.batch_size
                scores = evaluate(model, held_out, size, device, cfg.train.dtype, env, sharded).record(0)
                after_eval(step_module)
                metrics.write(scores)
                progress.echo(_eval_line(scores))
            if cfg.eval.prompts and (is_main or sharded):
                trackers.log_answers(0, hook(0))
                after_eval(step_module)
        while step < last:
            step += 1
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum = torch.zeros((), device=device)
            tokens = 0
            micro_batches = [next(batches) for _ in range(accum)]
            # token-weighted: every token of the global batch weighs the same, whatever the split; the
            # ranks of a sequence group hold the same labels, so only the group's first counts them
            counted = sequence is None or sequence.rank == 0
            if pref_steps is None:
                denom = step_targets(env, [b["labels"] for b in micro_batches] if counted else [], device)
            for micro, batch in enumerate(micro_batches):
                last_micro = micro == accum - 1
                if pref_steps is None:
                    # DDP and FSDP2 average gradients over all ranks: times the world size undoes that (with
                    # sequence parallelism too: a group's ranks' gradients add up to its batch's, see dist.sequence)
                    loss, n = _micro_step(step_module, batch, device, cfg, env.world_size, last_micro, scaler, denom)
                else:  # the mean over the step's pairs (each micro-batch's pair mean; reduce_step sums ranks)
                    loss, n = pref_steps.micro_step(step_module, batch, device, cfg, accum, last_micro, scaler)
                    loss = loss / (accum * world)
                loss_sum += loss
                tokens += n if sequence is None or sequence.rank == 0 else 0  # a group counts its batch once
            # the job's mean token loss and tokens (every rank gets them, so all stop together on NaN)
            loss_value, tokens = reduce_step(env, loss_sum, tokens)
            if not math.isfinite(loss_value):
                where = f"the last good checkpoint is {saved}" if saved else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; stopped before applying it ({where}). "
                    "Lower train.lr or raise train.warmup_ratio, then --resume auto"
                )
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
            grad_norm = clip_gradients(params, cfg.train.max_norm)
            if scaler is None:
                optimizer.step()
            else:  # skips the step when fp16 gradients overflowed, and adapts the scale
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            consumed += global_batch(cfg.train.batch_size, accum, world)  # sequences: resumable on any split
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "epoch": consumed / len(dataset),
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed,
                "time_s": elapsed,
            }
            if pref_steps is not None:  # TRL's names: rewards/chosen, rewards/accuracies, logps/chosen, ...
                record.update(pref_steps.step_metrics(env))
            metrics.write(record)
            progress.update(record, total, log=step % cfg.train.log_steps == 0 or step == last)
            scores = None  # the held-out figures, before the checkpoint: a new best is saved now
            if held_out is not None and _eval_due(cfg, step, last):
                size = cfg.eval.batch_size or cfg.train.batch_size
                scores = evaluate(model, held_out, size, device, cfg.train.dtype, env, sharded, objective).record(step)
                after_eval(step_module)
                metrics.write(scores)
                progress.echo(_eval_line(scores))
            new_best = scores is not None and best.improves(scores)
            if step % cfg.save.save_steps == 0 or step == last or new_best:
                meta = {
                    "scheduler": scheduler.state_dict(),
                    "data": {"sequences": consumed, "micro_batches": consumed // cfg.train.batch_size},
                    "config": cfg.to_dict(),
                    "method": cfg.method.kind,
                }
                if scaler is not None:
                    meta["scaler"] = scaler.state_dict()
                if sharded:  # every rank writes its shards
                    saved = dist_ckpt.save_sharded(work, step, model, optimizer, meta, cfg.save.save_total_limit, env)
                else:  # replicated state: rank 0 writes it, with every rank's RNG
                    rng = dist_ckpt.rng_payload(env) if env.enabled else {"rng": checkpoint.rng_state()}
                    saved = work / f"iter_{step}.pth"
                    if is_main:
                        saved = checkpoint.save(
                            work,
                            step,
                            {
                                "model": trainable_state(model, cfg.method.kind),
                                "optimizer": optimizer.state_dict(),
                                **meta,
                                **rng,
                            },
                            cfg.save.save_total_limit,
                        )
                if new_best:
                    best.keep(saved, step, scores[cfg.save.best_metric])
            # FSDP2 ranks generate together (each forward gathers shards); DDP's rank 0 alone
            if (hook.due(step, total) or (step == last and cfg.eval.prompts)) and (is_main or sharded):
                trackers.log_answers(step, hook(step))
                after_eval(step_module)
    finally:
        progress.close()
        metrics.close()
    if is_main:
        try:
            plot_loss(work)
        except FileNotFoundError:
            pass
    # Leave together: a rank that left the process group (and exited) while rank 0 still ran the
    # last evaluation aborted at exit now and then ("terminate called without an active exception")
    barrier(env)
    return TrainResult(steps=step, last_loss=loss_value, checkpoint=saved, work_dir=work, is_main=is_main)


def describe_data(stats: dict[str, Any], max_length: int) -> str:
    """One line on what tokenizing gave, e.g. "data: 395 records -> 395 samples (10,950 tokens
    trained on) -> 93 sequences of up to 256 tokens, packed"."""
    line = f"data: {plural(stats['records'], 'record')} -> {plural(stats['samples'], 'sample')}"
    if "target_tokens" in stats:
        line += f" ({stats['target_tokens']:,} tokens trained on)"
    line += f" -> {plural(stats['sequences'], 'sequence')} of up to {max_length} tokens"
    if stats.get("packed"):
        line += ", packed"
    dropped, truncated = stats.get("dropped", 0), stats.get("truncated", 0)
    if dropped or truncated:
        line += f"; {dropped} dropped, {truncated} truncated (see `tunex check-custom-dataset`)"
    return line


def _eval_due(cfg: Any, step: int, last: int) -> bool:
    every = cfg.eval.every_n_steps
    return step == last or (every > 0 and step % every == 0)


def _eval_line(scores: dict[str, Any]) -> str:
    if "eval_pairs" in scores:  # a preference objective's figures (TRL's names)
        return preference_line(scores)
    return (
        f"[eval step {scores['step']}] eval_loss {scores['eval_loss']:.4f}  "
        f"eval_perplexity {scores['eval_perplexity']:.3f}  ({scores['eval_tokens']:,} target tokens)"
    )


def _sequences(data: dict[str, Any], batch_size: int) -> int:
    """Sequences a checkpoint's run had trained on (older checkpoints count micro-batches of the
    run's batch size)."""
    if "sequences" in data:
        return int(data["sequences"])
    return int(data["micro_batches"]) * batch_size


def _batches_per_epoch(dataset: Any, cfg: Any) -> int:
    from tunex.data import make_loader

    n = len(make_loader(dataset, cfg.train.batch_size, seed=cfg.train.seed, shuffle=True))
    if n == 0:
        raise TunexError(f"data.path {cfg.data.path!r}: the dataset is empty after tokenization")
    return n
