"""``tunex estimate CFG``: predict peak GPU memory of a training config without loading weights."""

from __future__ import annotations

import json

import click


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(estimate)


@click.command()
@click.argument("config")
@click.option(
    "--model-config",
    default=None,
    metavar="CONFIG_JSON",
    help="The model's config.json, for a model.path that is not on this machine.",
)
@click.option(
    "--preset",
    default=None,
    metavar="NAME",
    help="A built-in model shape: llama2-7b, llama3-8b, internlm2-7b, qwen2-7b, mistral-7b, smollm2-135m, "
    "llama2-70b, qwen2-72b.",
)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="Tokens per sequence (default data.max_length; preference data: twice that, a pair's two sides).",
)
@click.option("--batch-size", type=int, default=None, help="Sequences per step (default train.batch_size).")
@click.option("--checkpointing/--no-checkpointing", default=None, help="Override train.gradient_checkpointing.")
@click.option(
    "--offload-checkpoints",
    is_flag=True,
    help="Assume checkpoints live in pinned CPU memory (as train.offload_checkpoints = true does).",
)
@click.option(
    "--adapter-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default=None,
    help="dtype of LoRA adapters and their gradients (train.adapter_dtype; AdamW's moments stay float32).",
)
@click.option(
    "--gpus",
    type=int,
    default=None,
    help="GPUs the run is sharded over (train.fsdp = true, LoRA/QLoRA): predicts one GPU's peak.",
)
@click.option(
    "-o",
    "--cfg-options",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. -o method.r=16 (repeatable).",
)
@click.option(
    "--budget",
    default=None,
    metavar="SIZE",
    help="Device memory to check against, e.g. 8GB or 24GiB; suggests changes that fit.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON (bytes).")
def estimate(
    config: str,
    model_config: str | None,
    preset: str | None,
    seq_len: int | None,
    batch_size: int | None,
    checkpointing: bool | None,
    offload_checkpoints: bool,
    adapter_dtype: str | None,
    gpus: int | None,
    overrides: tuple[str, ...],
    budget: str | None,
    as_json: bool,
) -> None:
    """Predict the peak GPU memory of training CONFIG (a .toml file or a built-in config name).

    \b
    The model's shape comes from model.path (an HF folder, config.json, GGUF file or a known hub
    id) or from --model-config / --preset; no weights are read. The number predicts
    torch.cuda.max_memory_allocated for tunex's training step in bf16 on a GPU.
    """
    from tunex.config import load_config
    from tunex.estimate import (
        DTYPE_BYTES,
        advise,
        device_need,
        estimate_memory,
        format_estimate,
        plan_from_config,
        resolve_shape,
    )
    from tunex.units import parse_size

    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--gpus", gpus)):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be a positive integer, got {value}", param_hint=name)
    try:
        budget_bytes = parse_size(budget) if budget is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--budget") from None
    cfg = load_config(config, overrides)
    shape = resolve_shape(cfg.model.path, model_config, preset)
    plan = plan_from_config(
        cfg,
        seq_len=seq_len,
        batch=batch_size,
        checkpointing=checkpointing,
        offload_checkpoints=offload_checkpoints or None,
        adapter_bytes=DTYPE_BYTES[adapter_dtype] if adapter_dtype else None,
        gpus=gpus,
    )
    try:
        est = estimate_memory(shape, plan)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus" if gpus and gpus > 1 else "CONFIG") from None
    vision = None
    if getattr(cfg, "vision", None) is not None and cfg.vision.path:  # LLaVA: tower, projector, image tokens
        from tunex.estimate_vision import add_to_estimate

        vision = add_to_estimate(est, cfg, plan.dtype_bytes)
    if as_json:
        out = {
            "peak_bytes": est.peak,
            "device_bytes": device_need(est),
            "peak_phase": est.peak_phase,
            "params": est.params,
            "trainable": est.trainable,
            "parts": est.parts,
            "phases": est.phases,
        }
        if budget_bytes is not None:
            out["fits"] = device_need(est) <= budget_bytes
        if vision is not None:
            out["vision"] = vision.as_dict()
        click.echo(json.dumps(out, indent=2))
        return
    if vision is not None:
        from tunex.estimate_vision import describe

        click.echo(describe(vision, cfg))
    click.echo(format_estimate(est))
    if budget_bytes is not None:
        click.echo("")
        click.echo("\n".join(advise(shape, plan, budget_bytes)))
