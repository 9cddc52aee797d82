"""``loss.png``: a training run's curves from ``work_dir/metrics.jsonl``, drawn with matplotlib.

Top panel: the loss of every step (thin), its smoothed curve over it, and the held-out eval loss as
points (records with ``eval_loss``); bottom panel: the learning rate. Axes carry their values and
labels, so the picture reads without the log beside it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from tunex.train.metrics import METRICS_FILE, read_metrics

RAW, SMOOTH, EVAL, LR = "#9ecae1", "#08519c", "#d94801", "#41ab5d"


def smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average with weight ``2 / (span + 1)`` on the newest value, debiased at the
    start (each point is the weighted mean of the values so far, as pandas' ``ewm(adjust=True)``),
    so the first points are not pulled towards zero."""
    alpha = 2.0 / (span + 1)
    out, num, den = [], 0.0, 0.0
    for v in values:
        num = v + (1 - alpha) * num
        den = 1 + (1 - alpha) * den
        out.append(num / den)
    return out


def smoothing_span(n: int) -> int:
    """Steps the smoothed curve averages over: about a fifth of the run, 3 to 50."""
    return max(3, min(50, round(n / 5)))


def _finite(record: dict[str, Any], key: str) -> bool:
    value = record.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_figure(records: list[dict[str, Any]], title: str) -> Any:
    """A matplotlib Figure of ``records`` (metrics.jsonl's lines); no pyplot state is touched.

    Raises:
        ValueError: no record has a finite ``loss``.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if _finite(r, "loss") and "step" in r]
    if not train:
        raise ValueError("no loss values")
    evals = [r for r in records if _finite(r, "eval_loss") and "step" in r]
    lrs = [r for r in train if _finite(r, "lr")]
    steps = [r["step"] for r in train]
    losses = [float(r["loss"]) for r in train]

    fig = Figure(figsize=(8, 5.5 if lrs else 4.5), dpi=100, layout="constrained")
    if lrs:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    fig.suptitle(title)
    ax.plot(steps, losses, color=RAW, linewidth=1, marker="." if len(steps) <= 60 else None, label="loss per step")
    span = smoothing_span(len(losses))
    if len(losses) > 2:
        ax.plot(steps, smoothed(losses, span), color=SMOOTH, linewidth=2, label=f"smoothed (~{span} steps)")
    if evals:
        ax.scatter(
            [r["step"] for r in evals],
            [float(r["eval_loss"]) for r in evals],
            color=EVAL,
            marker="D",
            s=36,
            zorder=3,
            label="eval loss (held out)",
        )
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    summary = f"step {steps[0]}: {losses[0]:.3f}   step {steps[-1]}: {losses[-1]:.3f}"
    if evals:
        summary += f"   eval at step {evals[-1]['step']}: {float(evals[-1]['eval_loss']):.3f}"
    ax.set_title(summary, fontsize=9, loc="left")
    bottom = ax
    if ax_lr is not None:
        ax_lr.plot([r["step"] for r in lrs], [float(r["lr"]) for r in lrs], color=LR, linewidth=1.5)
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.grid(alpha=0.3)
        bottom = ax_lr
    bottom.set_xlabel("step")
    return fig


def plot_loss(work_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the curves of ``work_dir/metrics.jsonl`` to ``loss.png`` (or ``out``), atomically.

    Raises:
        FileNotFoundError: when the folder has no metrics.jsonl with loss values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tunex.io.atomic import atomic_file

    work = Path(work_dir)
    try:
        fig = loss_figure(read_metrics(work), f"{work.resolve().name}: training loss")
    except ValueError:
        raise FileNotFoundError(
            f"{work / METRICS_FILE}: no loss values to plot (is this the work_dir of a `tunex train` run?)"
        ) from None
    target = Path(out) if out else work / "loss.png"
    FigureCanvasAgg(fig)
    with atomic_file(target) as f:
        fig.savefig(f, format="png")
    return target
