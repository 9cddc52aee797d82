"""``tunex convert gguf_to_hf`` and ``tunex convert hf_to_gguf``: llama.cpp's format in and out."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    convert.add_command(gguf_to_hf_cmd)
    convert.add_command(hf_to_gguf_cmd)


@click.command("gguf_to_hf")
@click.argument("gguf_file")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Write into OUT_DIR even if it is not empty.")
def gguf_to_hf_cmd(gguf_file: str, out_dir: Path, overwrite: bool) -> None:
    """Convert GGUF_FILE (or pkg://PACKAGE/FILE) to an fp32 HF folder OUT_DIR."""
    from tunex.gguf_io import gguf_to_hf
    from tunex.models.hub import package_file

    source = package_file(gguf_file) if gguf_file.startswith("pkg://") else Path(gguf_file)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass --overwrite or choose another folder")
    gguf_to_hf(source, out_dir)
    click.echo(f"wrote {out_dir}")


@click.command("hf_to_gguf")
@click.argument("model_dir")
@click.argument("out_file", type=click.Path(path_type=Path))
@click.option(
    "--outtype",
    type=click.Choice(["f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]),
    default="f16",
    show_default=True,
    help="Tensor type of the 2-D weights (1-D tensors stay f32); the K-quant mixes pick each tensor's "
    "type as llama.cpp's llama-quantize does.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_FILE if it exists.")
@click.option(
    "--modelfile",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write an Ollama Modelfile here (FROM OUT_FILE, the chat template, stop words, system prompt).",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help="UTF-8 text (e.g. the fine-tune's data, not the text you evaluate on) to run the model over "
    "first (up to 16384 tokens): each layer's weights are then rounded by GPTQ, one input column at a "
    "time, later columns correcting the output error of earlier ones over that text, into the same "
    "block types and file size. Costs a few passes of the model over the text plus the rounding "
    "(SmolLM2-135M: minutes on a CPU).",
)
@click.option(
    "--importance-only",
    is_flag=True,
    help="With --calibration: only weigh each block's search by the activations, without GPTQ "
    "(the bytes llama.cpp's llama-quantize --imatrix writes; faster, a little less accurate).",
)
def hf_to_gguf_cmd(
    model_dir: str,
    out_file: Path,
    outtype: str,
    overwrite: bool,
    modelfile: Path | None,
    calibration: Path | None,
    importance_only: bool,
) -> None:
    """Write the HF model MODEL_DIR (e.g. a merged fine-tune) as the GGUF file OUT_FILE."""
    from tunex.gguf_io import hf_to_gguf
    from tunex.ollama import modelfile_of, write_text

    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} exists; pass --overwrite to replace it")
    text = None
    if modelfile is not None:
        if modelfile.exists() and not overwrite:
            raise FileExistsError(f"{modelfile} exists; pass --overwrite to replace it")
        text = modelfile_of(model_dir, out_file, modelfile)  # a template Ollama cannot take fails before the export
    if calibration is not None:
        from tunex.gguf_imatrix import read_calibration_text

        read_calibration_text(calibration)  # a bad file fails before anything is written
    elif importance_only:
        raise click.UsageError("--importance-only needs --calibration TEXT")
    path = hf_to_gguf(model_dir, out_file, outtype, calibration=calibration, gptq=not importance_only)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {outtype})")
    if text is not None:
        write_text(modelfile, text)
        click.echo(f"wrote {modelfile} (ollama create NAME -f {modelfile})")
