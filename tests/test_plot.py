"""loss.png and `tunex plot`: labelled axes with values, a title, the smoothed curve over the raw one,
eval loss points and the learning rate; the PNG read back is the drawn size and not blank."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread
from tunex.cli import cli
from tunex.train.metrics import read_metrics
from tunex.train.plot import loss_figure, plot_loss, smoothed, smoothing_span


def _write_metrics(folder, steps=40, evals=(10, 20, 40)):
    """A run's metrics.jsonl as the trainer and the eval hook write it, by hand."""
    lines = []
    for step in range(1, steps + 1):
        loss = 3.2 - 0.5 * math.log(step) / math.log(steps) + 0.15 * math.sin(step * 1.7)
        lr = 1e-3 * min(1.0, step / 4) * (1 - (step - 1) / steps)
        lines.append({"step": step, "loss": loss, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 100.0})
        if step in evals:
            lines.append({"step": step, "eval_loss": 3.0 - step / 100, "eval_perplexity": math.exp(3.0 - step / 100)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


def test_smoothed_is_the_debiased_ema():
    values = [3.0, 2.0, 4.0, 1.0, 5.0, 2.5]
    span = 3
    alpha = 2 / (span + 1)
    # oracle: each point is the mean of the values so far weighted (1 - alpha) ** age
    expected = []
    for i in range(len(values)):
        weights = [(1 - alpha) ** (i - j) for j in range(i + 1)]
        expected.append(sum(w * v for w, v in zip(weights, values)) / sum(weights))
    assert smoothed(values, span) == pytest.approx(expected)
    pandas = pytest.importorskip("pandas")
    assert smoothed(values, span) == pytest.approx(list(pandas.Series(values).ewm(span=span, adjust=True).mean()))


def test_figure_has_labelled_axes_title_curves_eval_points_and_lr(tmp_path):
    lines = _write_metrics(tmp_path)
    fig = loss_figure(read_metrics(tmp_path), "run1: training loss")
    loss_ax, lr_ax = fig.axes
    assert fig.get_suptitle() == "run1: training loss"
    assert loss_ax.get_ylabel() == "loss" and lr_ax.get_ylabel() == "learning rate"
    assert lr_ax.get_xlabel() == "step"
    assert "step 1: " in loss_ax.get_title(loc="left") and "eval at step 40: 2.600" in loss_ax.get_title(loc="left")
    train = [r for r in lines if "loss" in r]
    raw, smooth = loss_ax.get_lines()
    assert list(raw.get_xdata()) == [r["step"] for r in train]
    assert list(raw.get_ydata()) == pytest.approx([r["loss"] for r in train])
    span = smoothing_span(len(train))
    assert list(smooth.get_ydata()) == pytest.approx(smoothed([r["loss"] for r in train], span))
    assert smooth.get_linewidth() > raw.get_linewidth() and smooth.get_zorder() >= raw.get_zorder()
    # the smoothed curve is quieter than the raw one
    assert np.std(np.diff(smooth.get_ydata())) < np.std(np.diff(raw.get_ydata()))
    (points,) = loss_ax.collections
    assert points.get_offsets().tolist() == [[10, 2.9], [20, 2.8], [40, 2.6]]
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels == ["loss per step", f"smoothed (~{span} steps)", "eval loss (held out)"]
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == pytest.approx([r["lr"] for r in train])
    # the axes show values: tick labels are drawn on both panels
    fig.canvas.draw()
    assert any(t.get_text() for t in loss_ax.get_yticklabels())
    assert any(t.get_text() for t in lr_ax.get_xticklabels())


def test_png_read_back_is_the_figure_and_not_blank(tmp_path):
    _write_metrics(tmp_path)
    png = plot_loss(tmp_path)
    assert png == tmp_path / "loss.png"
    pixels = imread(png)
    assert pixels.shape[:2] == (550, 800)
    rgb = pixels[..., :3]
    ink = (rgb < 0.9).any(axis=-1).mean()
    assert 0.02 < ink < 0.5, ink  # text, axes and curves; not an empty canvas, not a filled one
    # the eval points' colour (orange) and the smoothed curve's (dark blue) are both on the canvas
    assert ((rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.45) & (rgb[..., 2] < 0.2)).sum() > 20
    assert ((rgb[..., 2] > 0.45) & (rgb[..., 0] < 0.15) & (rgb[..., 1] < 0.45)).sum() > 100


def test_without_lr_or_eval_one_panel(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1 / i}) + "\n" for i in range(1, 5)))
    fig = loss_figure(read_metrics(tmp_path), "t")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "step" and not ax.collections
    assert imread(plot_loss(tmp_path)).shape[:2] == (450, 800)


def test_plot_command_writes_out_and_refuses_a_folder_without_losses(tmp_path):
    _write_metrics(tmp_path, steps=6, evals=(6,))
    out = tmp_path / "sub" / "curves.png"
    result = CliRunner().invoke(cli, ["plot", str(tmp_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}"
    assert imread(out).shape[:2] == (550, 800)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_loss": 2.0}) + "\n")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 1 and "no loss values to plot" in result.output
