"""``tunex eval CFG_OR_MODEL``: the held-out loss and perplexity of a model, as training reports them
(with a preference objective's config: the held-out pairs' loss and TRL's eval metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tunex.config import DATA_FORMATS


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(eval_)


def _is_config(target: str) -> bool:
    """A .toml file or a built-in config name (a model is a folder, a .gguf file or pkg://...)."""
    if target.endswith(".toml"):
        return True
    if target.startswith("pkg://") or Path(target).exists():
        return False
    from tunex import builtin_configs

    return target in builtin_configs.names()


@click.command("eval")
@click.argument("target", metavar="CFG_OR_MODEL")
@click.option(
    "--data",
    "data",
    multiple=True,
    help="Held-out data file or folder (repeatable); default with a config: its eval.data, else its eval.split.",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path, exists=True),
    help="PEFT LoRA adapter folder applied on top of the model; with a config also a training "
    "checkpoint (iter_N.pth, best.pth).",
)
@click.option("--format", "fmt", type=click.Choice(DATA_FORMATS), default=None, help="Record format of --data.")
@click.option("--template", default=None, help="Chat template (default: the config's, else the model's own).")
@click.option("--max-length", type=click.IntRange(16), default=None, help="Tokens per sample (default 2048).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Sequences per forward.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option(
    "-o",
    "--cfg-options",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of the config (repeatable).",
)
def eval_(
    target: str,
    data: tuple[str, ...],
    adapter: Path | None,
    fmt: str | None,
    template: str | None,
    max_length: int | None,
    batch_size: int | None,
    device: str,
    as_json: bool,
    overrides: tuple[str, ...],
) -> None:
    """Print the mean token loss (eval_loss) and perplexity of a model on held-out data.

    \b
    CFG_OR_MODEL is a training config (its model, template, data settings and, without --data,
    its eval.data or eval.split) or a model (HF folder, .gguf file, pkg://PACKAGE/FILE).
    A config with a preference objective (train.objective) scores held-out pairs instead:
    eval_loss is the objective's loss, with TRL's eval_rewards/accuracies and the rest.
    """
    import dataclasses

    import torch

    from tunex.config import DataConfig, load_config
    from tunex.errors import TunexError
    from tunex.train.evaluate import build_eval_set, evaluate
    from tunex.train.preference import Objective

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cfg = load_config(target, overrides) if _is_config(target) else None
    if cfg is not None and cfg.vision.path:
        raise click.UsageError(
            f"{cfg.source}: a [vision] config's held-out loss is measured while it trains (eval.split / eval.data "
            "with eval.every_n_steps); tunex eval scores text models"
        )
    if cfg is None and overrides:
        raise click.UsageError("-o/--cfg-options needs a config as CFG_OR_MODEL")
    if cfg is None and adapter is not None and adapter.is_file():
        raise click.UsageError(f"--adapter {adapter}: a training checkpoint needs the config that trained it")
    model_path = cfg.model.path if cfg else target
    objective = Objective.of(cfg) if cfg else None
    if objective is not None and objective.name == "reward" and not (adapter is not None and adapter.is_file()):
        raise click.UsageError("a reward model's score head is in its training checkpoint: give --adapter iter_N.pth")
    tokenizer = _tokenizer(cfg, model_path)

    if cfg is None:
        if not data:
            raise click.UsageError("--data is needed when CFG_OR_MODEL is a model")
        data_cfg = DataConfig(path=list(data), format=fmt or "alpaca", template=template or "auto")
    else:
        data_cfg = cfg.data
        if data:
            data_cfg = dataclasses.replace(data_cfg, path=list(data), format=fmt or cfg.eval.format or cfg.data.format)
        elif fmt:
            data_cfg = dataclasses.replace(data_cfg, format=fmt)
        if template:
            data_cfg = dataclasses.replace(data_cfg, template=template)
    if max_length:
        data_cfg = dataclasses.replace(data_cfg, max_length=max_length)
    data_cfg = dataclasses.replace(data_cfg, shuffle_before_pack=False, cache_dir="")

    from tunex.data import build_dataset

    seed = cfg.train.seed if cfg else 0
    if cfg is not None and not data:  # the held-out set training measures
        if not (cfg.eval.data or cfg.eval.split):
            raise click.UsageError(f"{cfg.source} sets neither eval.data nor eval.split: give --data")
        if cfg.eval.data:
            cfg.eval.format = fmt or cfg.eval.format
            cfg.data = dataclasses.replace(data_cfg, path=cfg.data.path)
            _, held = build_eval_set(cfg, tokenizer, None, None)
        else:
            train_cfg = dataclasses.replace(cfg.data, cache_dir="")  # the training data as packed there
            full = build_dataset(train_cfg, tokenizer, seed=seed)
            _, held = build_eval_set(cfg, tokenizer, full, None)
    else:
        held = build_dataset(data_cfg, tokenizer, seed=seed)
    if len(held) == 0:
        raise TunexError(f"--data {', '.join(data)}: no sample left after tokenization")

    def before_checkpoint(lm):  # a full fine-tune's reference: the starting weights, one pass
        nonlocal held
        if objective is not None and objective.reference and cfg.method.kind == "full":
            from tunex.dist.env import DistEnv
            from tunex.train.reference import with_reference

            held = with_reference(held, lm, cfg, dev, DistEnv())

    lm = _load(cfg, model_path, adapter, dev, before_checkpoint)
    size = batch_size or (cfg.eval.batch_size or cfg.train.batch_size if cfg else 1)
    result = evaluate(lm, held, size, dev, cfg.train.dtype if cfg else "auto", objective=objective)
    if as_json:
        figures = {k: v for k, v in result.record(0).items() if k != "step"}
        if objective is None:
            figures["sequences"] = result.sequences
        click.echo(json.dumps(figures))
    else:
        click.echo(result.line())


def _tokenizer(cfg, model_path: str):
    from tunex.models import read_config, resolve_model_path
    from tunex.models.config import check_tokenizer_fits
    from tunex.tokenizer import load_tokenizer

    folder = resolve_model_path(model_path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or folder if cfg else folder)
    check_tokenizer_fits(tokenizer, read_config(folder), folder, cfg.model.tokenizer if cfg else "")
    return tokenizer


def _load(cfg, model_path: str, adapter: Path | None, dev, before_checkpoint=None):
    """The model with the adapter or checkpoint applied (``before_checkpoint(lm)`` runs on the
    starting weights of a config's model before a training checkpoint is loaded into it)."""
    from tunex.models import load_model, resolve_model_path
    from tunex.train.build import weights_dtype

    folder = resolve_model_path(model_path)
    if adapter is not None and adapter.is_file():  # a training checkpoint (with its config: checked above)
        from tunex.train import checkpoint
        from tunex.train.build import build_model
        from tunex.train.loop import load_trainable

        lm = build_model(cfg, dev)
        if cfg.train.objective == "reward":  # the trained head comes with the checkpoint
            from tunex.train.preference import add_reward_head

            add_reward_head(lm, None if cfg.method.kind == "full" else _adapter_dtype(cfg))
        if before_checkpoint is not None:
            before_checkpoint(lm)
        load_trainable(lm, checkpoint.load(adapter)["model"], adapter)
        return lm
    quantize = None
    if cfg is not None and cfg.method.kind == "qlora":  # the 4-bit base the adapter was trained on
        from tunex.quant import NF4Linear

        m = cfg.method
        compute = weights_dtype(m.compute_dtype, dev)

        def quantize(name, linear):
            return NF4Linear.from_linear(linear, m.quant_type, m.blocksize, m.double_quant, compute)

    lm = load_model(folder, dtype=weights_dtype(cfg.model.dtype if cfg else "auto", dev), device=dev, quantize=quantize)
    if before_checkpoint is not None:
        before_checkpoint(lm)
    if adapter is not None:
        from tunex.models.adapter import apply_adapter

        apply_adapter(lm, adapter)
    return lm


def _adapter_dtype(cfg):
    import torch

    return torch.bfloat16 if cfg.train.adapter_dtype == "bfloat16" else torch.float32
