"""``tunex convert pth_to_hf CFG PTH SAVE_PATH``: a training checkpoint -> a PEFT adapter folder
(LoRA / QLoRA) or a HF model folder (full fine-tune)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    convert.add_command(pth_to_hf)
    _accept_checkpoints_in_merge(convert)


def _accept_checkpoints_in_merge(convert: click.Group) -> None:
    """Give ``convert merge`` (commands/merge.py, registered before this module) a ``--config``
    option: with it, ADAPTER may be a training checkpoint (iter_N.pth), turned into a temporary
    fp32 PEFT adapter folder first, and BASE may be anything ``tunex train`` accepts as
    ``model.path`` (a GGUF, ``pkg://``...)."""
    cmd = convert.commands.get("merge")
    if cmd is None:
        return
    cmd.params.append(
        click.Option(
            ["--config"],
            default=None,
            metavar="CFG",
            help="Config of the training run when ADAPTER is its iter_N.pth checkpoint.",
        )
    )
    inner = cmd.callback

    @functools.wraps(inner)
    def callback(*args, config: str | None = None, **kwargs):
        adapter = Path(kwargs["adapter"])
        if config is None:
            if adapter.is_file():
                raise click.UsageError(
                    f"ADAPTER {adapter} is a file: a training checkpoint merges with "
                    "--config CFG (the config of its run, e.g. WORK_DIR/config.toml)"
                )
            return inner(*args, **kwargs)
        from tunex.config import load_config
        from tunex.models import resolve_model_path
        from tunex.train.export import checkpoint_as_adapter

        cfg = load_config(config)
        if kwargs.get("prompt_template") is None:  # the end-of-turn token the run trained
            kwargs["prompt_template"] = cfg.data.template
        if not Path(kwargs["base"]).is_dir():
            kwargs["base"] = resolve_model_path(str(kwargs["base"]))
        with tempfile.TemporaryDirectory(prefix="tunex-adapter-") as tmp:
            kwargs["adapter"] = checkpoint_as_adapter(cfg, adapter, Path(tmp) / "adapter")
            return inner(*args, **kwargs)

    cmd.callback = callback


@click.command("pth_to_hf")
@click.argument("config")
@click.argument("pth", type=click.Path(path_type=Path))
@click.argument("save_path", type=click.Path(path_type=Path))
@click.option("--fp32", is_flag=True, help="Save float32 tensors (default float16, as XTuner).")
@click.option(
    "--max-shard-size",
    default="2GB",
    show_default=True,
    help="Largest shard of a full model (KB/MB/GB decimal, KiB/MiB/GiB binary).",
)
def pth_to_hf(config: str, pth: Path, save_path: Path, fp32: bool, max_shard_size: str) -> None:
    """Convert training checkpoint PTH (iter_N.pth) of CONFIG to HF format in SAVE_PATH.

    \b
    LoRA / QLoRA: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    Full: a HF model folder (sharded safetensors, config.json, tokenizer files).
    """
    from tunex.config import load_config
    from tunex.train.export import convert_checkpoint

    cfg = load_config(config)
    kind = convert_checkpoint(cfg, pth, save_path, fp32=fp32, max_shard_size=max_shard_size)
    click.echo(f"wrote {kind} to {save_path}")
