"""``tunex quantize MODEL_DIR OUT_DIR``: a HF model folder -> a pre-quantized 4-bit (bitsandbytes
layout) HF checkpoint that transformers and tunex's QLoRA load directly."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(quantize)


@click.command("quantize")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--quant-type",
    type=click.Choice(["nf4", "fp4"]),
    default="nf4",
    show_default=True,
    help="4-bit data type: NormalFloat4 (QLoRA) or FP4.",
)
@click.option(
    "--blocksize",
    type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
    default="64",
    show_default=True,
    help="Elements per absmax block.",
)
@click.option(
    "--double-quant/--no-double-quant",
    default=True,
    show_default=True,
    help="Also quantize the per-block absmax (about 0.516 instead of 0.5625 bytes per parameter).",
)
@click.option(
    "--max-shard-size", default="2GB", show_default=True, help="Largest shard (KB/MB/GB decimal, KiB/MiB/GiB binary)."
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="bnb_4bit_compute_dtype recorded in config.json for loaders.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def quantize(
    model_dir: Path,
    out_dir: Path,
    quant_type: str,
    blocksize: str,
    double_quant: bool,
    max_shard_size: str,
    compute_dtype: str,
    overwrite: bool,
) -> None:
    """Quantize the decoder-layer linear weights of the HF model in MODEL_DIR to 4 bits and write a
    bitsandbytes-layout checkpoint to OUT_DIR (embeddings, norms and the head are kept as they are).

    \b
    Example:
      tunex quantize ./Llama-2-7b-hf ./Llama-2-7b-nf4
    """
    from tunex.quant.checkpoint import quantize_checkpoint
    from tunex.units import parse_size

    parse_size(max_shard_size)  # a bad size fails before any work
    summary = quantize_checkpoint(
        model_dir,
        out_dir,
        quant_type=quant_type,
        blocksize=int(blocksize),
        double_quant=double_quant,
        max_shard_size=max_shard_size,
        compute_dtype=compute_dtype,
        overwrite=overwrite,
    )
    click.echo(
        f"quantized {summary['quantized']} weights to {quant_type} (blocksize {blocksize}"
        f"{', double quant' if double_quant else ''}), kept {summary['kept']} tensors: "
        f"{len(summary['files'])} file(s), {summary['file_bytes'] / 1e6:.1f} MB in {out_dir}"
    )
