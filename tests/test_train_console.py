"""What `tunex train` prints: start-up stages, the first step, whole lines in a log (no wrapping at
the console width), bars on a terminal only."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.train.progress import StartupLog, TrainProgress, plural

pytest.importorskip("transformers")


def test_train_log_reads_whole_lines_and_says_what_it_does(tmp_path):
    model = make_tiny_model(tmp_path / "m")
    # a long work dir: the summary line is far wider than the 80 columns rich assumes for a pipe
    work = tmp_path / ("a_rather_long_folder_name_for_the_work_dir_" * 2) / "work"
    cfg = write_config(
        tmp_path / "c.toml",
        model,
        make_data(tmp_path / "d", "instruct"),
        "lora",
        "openai",
        work,
        max_steps=4,
        log_steps=3,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TUNEX_DEBUG"] = "0"
    out = subprocess.run(
        [sys.executable, "-m", "tunex", "train", str(cfg), "-o", "eval.prompts=[]"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    summary = [line for line in lines if line.startswith("lora: ")]
    assert len(summary) == 1, out.stderr
    assert "x 1 process = global batch 4; work dir " + str(work) in summary[0]
    assert len(summary[0]) > 80
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == ["1/4", "3/4", "4/4"], out.stderr  # the first step, every log_steps, the last
    said = "\n".join(lines)
    order = [
        said.index(s) for s in ("reading 1 data path (openai)", "data: ", "loading the model ", "lora: ", "step 1/4")
    ]
    assert order == sorted(order), out.stderr
    data_line = next(line for line in lines if line.startswith("data: "))
    assert " records -> " in data_line and "sequences of up to 64 tokens" in data_line
    assert "\x1b[" not in out.stderr and "━" not in out.stderr  # no bars or colours in a log


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=40), buf


@pytest.mark.parametrize("terminal", [True, False])
def test_tokenizing_bar_on_a_terminal_only(terminal):
    console, buf = _console(terminal)
    startup = StartupLog(True, console)
    with startup.tokenizing() as progress:
        for done in range(1, 4):
            progress(done, 3)
    assert ("tokenizing" in buf.getvalue()) == terminal
    startup.echo("x" * 100)
    assert ("x" * 100) in buf.getvalue()  # whole, though the console is 40 columns wide


def test_first_step_is_logged_even_between_log_steps():
    console, buf = _console(False)
    progress = TrainProgress(10, 4, True, console)  # resumed at step 4
    record = {"step": 5, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0}
    progress.update(record, 10, log=False)
    progress.update({**record, "step": 6}, 10, log=False)
    progress.close()
    assert [line.split()[1] for line in buf.getvalue().splitlines()] == ["5/10"]


def test_plural():
    assert plural(1, "process", "processes") == "1 process"
    assert plural(2, "process", "processes") == "2 processes"
    assert plural(0, "record") == "0 records"
