"""``tunex train CFG`` and ``tunex plot WORK_DIR``."""

from __future__ import annotations

import gc
from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(train)
    cli.add_command(plot)


@click.command()
@click.argument("config")
@click.option("--work-dir", default=None, help="Output folder (default: save.work_dir, else work_dirs/<config name>).")
@click.option("--seed", type=int, default=None, help="Random seed (overrides train.seed).")
@click.option(
    "--resume",
    default=None,
    metavar="auto|PATH",
    help="Continue from a checkpoint (iter_N.pth or iter_N.shards): 'auto' = the newest one in the work dir.",
)
@click.option(
    "-o",
    "--cfg-options",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. -o train.lr=1e-4 (repeatable).",
)
@click.option(
    "--max-steps",
    type=int,
    default=None,
    hidden=True,
    help="Stop after this many optimizer steps of the planned run (the schedule is unchanged); used to test resuming.",
)
@click.option(
    "--nproc-per-node",
    type=int,
    default=None,
    metavar="N",
    help="Train on N processes of this node (one per GPU) under torchrun (default: $NPROC_PER_NODE, else 1).",
)
@click.option(
    "--nnodes",
    type=int,
    default=None,
    metavar="N",
    help="Nodes in the job (default: $NNODES, else 1); each node also needs NODE_RANK, "
    "ADDR and PORT in its environment. See docs/SCALING.md.",
)
def train(
    config: str,
    work_dir: str | None,
    seed: int | None,
    resume: str | None,
    overrides: tuple[str, ...],
    max_steps: int | None,
    nproc_per_node: int | None,
    nnodes: int | None,
) -> None:
    """Fine-tune a model as CONFIG says (a .toml file or a built-in config name).

    \b
    Writes to the work dir: the config used (config.toml), metrics.jsonl, iter_N.pth checkpoints,
    eval outputs and loss.png. Convert a checkpoint with `tunex convert pth_to_hf`.
    """
    from tunex.config import load_config
    from tunex.dist.launch import plan_launch, relaunch

    cfg = load_config(config, overrides)  # a bad config fails here, before any process starts
    plan = plan_launch(nproc_per_node, nnodes)
    if plan is not None:
        relaunch(plan, _own_args(config, work_dir, seed, resume, overrides, max_steps))

    from tunex.dist.env import shutdown
    from tunex.train.loop import train as run_training

    try:
        result = run_training(cfg, work_dir=work_dir, seed=seed, resume=resume, stop_after=max_steps)
    finally:
        # The model, its DDP wrapper and the optimizer are garbage now, some of them in reference
        # cycles: free them while their process group still exists (left to the interpreter's
        # exit, a DDP rank aborted there now and then: "terminate called without an active exception")
        gc.collect()
        shutdown()
    if result.is_main:
        click.echo(f"done: {result.steps} steps, last loss {result.last_loss:.4f}; checkpoint {result.checkpoint}")
        from tunex.train.evaluate import change_line
        from tunex.train.metrics import read_metrics

        moved = change_line(read_metrics(result.work_dir))
        if moved:  # the first and the last held-out evaluation (eval.at_start: the starting model's)
            click.echo(moved)


def _own_args(
    config: str,
    work_dir: str | None,
    seed: int | None,
    resume: str | None,
    overrides: tuple[str, ...],
    max_steps: int | None,
) -> list[str]:
    """This command's arguments for the workers (without the launcher options)."""
    args = ["train", config]
    for flag, value in (("--work-dir", work_dir), ("--seed", seed), ("--resume", resume), ("--max-steps", max_steps)):
        if value is not None:
            args += [flag, str(value)]
    for item in overrides:
        args += ["-o", item]
    return args


@click.command()
@click.argument("work_dir", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), default=None, help="PNG file to write (default WORK_DIR/loss.png)."
)
def plot(work_dir: Path, out: Path | None) -> None:
    """Draw a training run's curves (WORK_DIR/metrics.jsonl) as a PNG: loss per step, smoothed loss, eval loss and learning rate."""
    from tunex.train.plot import plot_loss

    click.echo(f"wrote {plot_loss(work_dir, out)}")
