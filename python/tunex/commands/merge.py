"""``tunex convert merge BASE ADAPTER SAVE_PATH``: fold a LoRA adapter into its base model."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    convert.add_command(merge_cmd)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@click.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("save_path", type=click.Path(path_type=Path))
@click.option(
    "--max-shard-size",
    default="2GB",
    show_default=True,
    help="Largest output shard (KB/MB/GB decimal as HF, KiB/MiB/GiB binary).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the low-rank products run: cpu (Rust) or cuda (torch); auto picks cuda when available.",
)
@click.option("--is-clip", is_flag=True, help="BASE is a CLIP model: merge into its vision tower.")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default=None,
    help="Output dtype of floating tensors [default: the base's].",
)
@click.option(
    "--prompt-template",
    default=None,
    help="Chat template the adapter was trained with (auto = the base's own, or a built-in name): its "
    "end-of-turn token joins eos_token_id in generation_config.json [default: auto, or the --config run's].",
)
@click.option("--overwrite", is_flag=True, help="Replace SAVE_PATH if it exists.")
@click.option(
    "--fsync/--no-fsync",
    default=True,
    show_default=True,
    help="Flush the output to disk before it appears (power-loss safe); --no-fsync leaves "
    "that to the OS, SAVE_PATH still appears only when complete.",
)
@click.option(
    "--safe-serialization/--no-safe-serialization",
    default=True,
    hidden=True,
    help="Accepted for XTuner compatibility; tunex always writes safetensors.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge_cmd(
    base: Path,
    adapter: Path,
    save_path: Path,
    max_shard_size: str,
    device: str,
    is_clip: bool,
    dtype: str | None,
    prompt_template: str | None,
    overwrite: bool,
    fsync: bool,
    safe_serialization: bool,
    quiet: bool,
) -> None:
    """Merge the LoRA ADAPTER folder into the HF model BASE and save the result to SAVE_PATH.

    Streams tensor by tensor (memory about one tensor, whatever the model size) and writes
    SAVE_PATH atomically: it appears only once complete.

    \b
    Example:
      tunex convert merge ./Llama-2-7b-hf ./work_dirs/adapter ./merged --max-shard-size 2GB
    """
    if not safe_serialization:
        raise click.UsageError("tunex writes safetensors only; drop --no-safe-serialization")
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from tunex.merge import merge

    columns = (
        TextColumn("[bold]merge"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
    )
    with Progress(*columns, transient=True, disable=quiet) as bar:
        task = bar.add_task("merge", total=None, name="")

        def progress(name: str, done: int, total: int, bytes_done: int, bytes_total: int) -> None:
            bar.update(task, completed=bytes_done, total=bytes_total, name=name)

        report = merge(
            base,
            adapter,
            save_path,
            max_shard_size=max_shard_size,
            dtype=dtype,
            device=device,
            is_clip=is_clip,
            template=prompt_template or "auto",
            overwrite=overwrite,
            progress=progress,
            fsync=fsync,
        )
    click.echo(describe(report, save_path))


def describe(report, save_path: Path) -> str:
    """One sentence saying what the merge did, e.g. "merged the adapter into 210 of 272 tensors and
    copied 62 unchanged on cpu in 5.0s: 1 file, 538.1 MB -> merged"."""
    unchanged = max(report.tensors - report.merged - report.replaced, 0)
    files = len(report.files)
    text = f"merged the adapter into {report.merged} of {report.tensors} tensors and copied {unchanged} unchanged"
    if report.replaced:  # PEFT's modules_to_save: the adapter carries the whole tensor
        text += f"; {report.replaced} replaced by the adapter's saved modules"
    text += (
        f" on {report.device} in {report.seconds:.1f}s: {files} file{'s' if files != 1 else ''}, "
        f"{_size(report.bytes_written)} -> {save_path}"
    )
    if report.io.startswith("buffered"):  # a probe turned O_DIRECT off (or TUNEX_DIRECT_IO=0): say so
        text += f"; {report.io}"
    return text
