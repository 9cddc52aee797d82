"""`tunex board`: its JSON routes over real work dirs, and the page in a real headless browser
(Debian's chromium through chromedriver, driven by selenium): the curves are drawn, the values
shown, and the page follows a run as lines are added. Screenshots go to test-artifacts/board/."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_train_helpers import QA, make_data, make_tiny_model, write_config
from tunex.board.server import make_server
from tunex.config import load_config
from tunex.train.loop import train
from tunex.train.metrics import read_metrics

pytest.importorskip("transformers")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "board"
OVERRIDES = ["eval.split=0.34", "eval.every_n_steps=3", 'save.best_metric="eval_loss"', "save.save_steps=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with two trained work dirs (6 steps each, evaluated at 3 and 6)."""
    import torch

    root = tmp_path_factory.mktemp("board")
    model = make_tiny_model(root / "model")
    data = make_data(root / "data", "instruct")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, lr in (("alpha", 2e-2), ("beta", 5e-3)):
            cfg = write_config(root / f"{name}.toml", model, data, "lora", "openai", root / "runs" / name, lr=lr)
            train(load_config(cfg, OVERRIDES), stop_after=6)
    finally:
        torch.set_num_threads(before)
    return root / "runs"


@pytest.fixture()
def board(runs):
    server = make_server(runs, port=0, interval_s=0.3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def test_routes_read_the_work_dirs(runs, board):
    assert get(f"{board}/api/runs")["runs"] == ["alpha", "beta"]
    view = get(f"{board}/api/run?name=alpha")
    assert view["metrics"] == read_metrics(runs / "alpha")
    assert [r["step"] for r in view["metrics"] if "eval_loss" in r] == [3, 6]
    assert [(a["step"], a["prompt"]) for a in view["answers"]] == [(3, QA[0][0]), (6, QA[0][0])]
    names = {c["name"] for c in view["checkpoints"]}
    assert {"iter_3.pth", "iter_6.pth", "best.pth"} <= names
    assert view["best"]["metric"] == "eval_loss" and "lr = 0.02" in view["config"]
    for bad in ("/api/run?name=gamma", "/static/..%2Fruns.py", "/static/nothing.js", "/nowhere"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(board + bad, timeout=30)
        assert info.value.code == 404
    with urllib.request.urlopen(f"{board}/static/chart.min.js", timeout=30) as reply:
        assert b"Chart.js v3.9.1" in reply.read(400)


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        # .ci/run installs them, so CI always runs this test; a developer's machine may lack them
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _wait(browser, script: str, timeout: float = 60.0):
    """Poll a JS expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(f"return {script};")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {script}")
        time.sleep(0.2)


def _text(browser, element_id: str) -> str:
    return browser.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)


# counts the canvas pixels that are not background: the drawn axes, labels and curves
INK = """
const c = document.getElementById(arguments[0]);
const img = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let ink = 0;
for (let i = 0; i < img.length; i += 4) if (img[i + 3] > 0 && (img[i] < 200 || img[i + 1] < 200)) ink++;
return ink;
"""
# pixels of one dataset's colour (r, g, b within 40): the curve itself, not the axes
COLOURED = """
const [id, r, g, b] = arguments;
const c = document.getElementById(id);
const img = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < img.length; i += 4)
  if (img[i + 3] > 200 && Math.abs(img[i] - r) < 40 && Math.abs(img[i + 1] - g) < 40 && Math.abs(img[i + 2] - b) < 40) n++;
return n;
"""


def test_page_draws_the_run_and_follows_it(runs, board, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers on the network
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = _browser()
    try:
        browser.get(board + "/")
        _wait(browser, "Number(document.body.dataset.updates || 0) >= 1")
        records = read_metrics(runs / "alpha")
        losses = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        lengths = browser.execute_script(
            "return ['chart-loss','chart-eval','chart-lr','chart-tps'].map("
            "id => Chart.getChart(document.getElementById(id)).data.datasets.map(d => d.data.length));"
        )
        assert lengths == [[len(losses), len(losses), len(evals)], [len(evals)], [len(losses)], [len(losses)]]
        first = browser.execute_script(
            "return Chart.getChart(document.getElementById('chart-loss')).data.datasets[0].data[0];"
        )
        assert first == {"x": 1, "y": pytest.approx(losses[0]["loss"])}
        for chart in ("chart-loss", "chart-eval", "chart-lr", "chart-tps"):
            assert browser.execute_script(INK, chart) > 500, chart  # axes, ticks and a curve drawn
        assert browser.execute_script(COLOURED, "chart-loss", 31, 119, 180) > 50  # the smoothed loss curve
        assert browser.execute_script(COLOURED, "chart-loss", 214, 39, 40) > 20  # the eval loss points
        # read in one script each: the page re-renders its tables on every update
        text = browser.execute_script("return document.body.innerText;")
        assert _text(browser, "last-loss") == f"{losses[-1]['loss']:.4f}"
        assert _text(browser, "last-eval-loss") == f"{evals[-1]['eval_loss']:.4f}"
        assert "iter_6.pth" in text and "best.pth" in text and QA[0][0] in text
        assert browser.execute_script("return document.querySelectorAll('#answers tbody tr').length;") == 2
        assert "lr = 0.02" in _text(browser, "config")
        browser.save_screenshot(str(ARTIFACTS / "board-alpha.png"))

        # the trainer appends a step: the page follows without a reload
        step7 = dict(losses[-1], step=7, loss=0.123456)
        with open(runs / "alpha" / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(step7) + "\n")
        _wait(browser, "document.getElementById('last-loss').textContent === '0.1235'")
        count = browser.execute_script(
            "return Chart.getChart(document.getElementById('chart-loss')).data.datasets[0].data.length;"
        )
        assert count == len(losses) + 1
        browser.save_screenshot(str(ARTIFACTS / "board-alpha-live.png"))

        # the other run of the folder
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element("id", "run")).select_by_value("beta")
        beta = [r for r in read_metrics(runs / "beta") if "loss" in r]
        _wait(browser, f"document.getElementById('last-loss').textContent === '{beta[-1]['loss']:.4f}'")
        assert "lr = 0.005" in _text(browser, "config")
        browser.save_screenshot(str(ARTIFACTS / "board-beta.png"))
    finally:
        browser.quit()


def test_board_command_serves_until_stopped(runs):
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "tunex", "board", str(runs), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert "2 run(s)" in line, line
        url = re.search(r"http://\S+/", line).group(0)
        assert get(url + "api/runs")["runs"] == ["alpha", "beta"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from click.testing import CliRunner
    from tunex.cli import cli

    result = CliRunner().invoke(cli, ["board", str(runs / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.output
