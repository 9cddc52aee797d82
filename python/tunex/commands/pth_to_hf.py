"""``tunex convert pth_to_hf CFG PTH SAVE_PATH``: a training checkpoint -> a PEFT adapter folder
(LoRA / QLoRA) or a HF model folder (full fine-tune)."""
from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    convert.add_command(pth_to_hf)


@click.command("pth_to_hf")
@click.argument("config")
@click.argument("pth", type=click.Path(path_type=Path))
@click.argument("save_path", type=click.Path(path_type=Path))
@click.option("--fp32", is_flag=True, help="Save float32 tensors (default float16, as XTuner).")
@click.option("--max-shard-size", default="2GB", show_default=True,
              help="Largest shard of a full model (KB/MB/GB decimal, KiB/MiB/GiB binary).")
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
