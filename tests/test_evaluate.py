"""Held-out evaluation: eval.data / eval.split during training, save.best_metric's best.pth, and
`tunex eval`, whose loss is checked against transformers (+ PEFT) on the same tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from test_train_helpers import QA, make_data, make_tiny_model, write_config
from tunex.cli import cli
from tunex.config import BEST_METRICS, DataConfig, load_config
from tunex.errors import ConfigError
from tunex.train import checkpoint, evaluate
from tunex.train.best import read_best
from tunex.train.loop import train
from tunex.train.metrics import read_metrics

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", tied=False)


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _reference_loss(model_dir, data_cfg, adapter=None) -> float:
    """Mean target-token NLL by transformers (+ PEFT) over tunex's tokenization, sample by sample."""
    import transformers
    from tunex.data import build_dataset
    from tunex.tokenizer import load_tokenizer

    samples = build_dataset(data_cfg, load_tokenizer(model_dir), seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter)
    hf.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(samples)):
            item = samples[i]
            logits = hf(input_ids=item["input_ids"][None]).logits[0, :-1].double()
            target = item["labels"][1:]
            keep = target != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return nll / count


def _random_adapter(model_dir, out):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(hf, lora).save_pretrained(out)
    return out


@pytest.mark.parametrize("with_adapter", [False, True])
def test_eval_command_matches_transformers(tmp_path, model, with_adapter):
    data = make_data(tmp_path / "d", "instruct")
    adapter = _random_adapter(model, tmp_path / "adapter") if with_adapter else None
    args = ["eval", str(model), "--data", str(data), "--format", "openai", "--json", "--batch-size", "2"]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    figures = json.loads(run_cli(*args).strip().splitlines()[-1])
    # tunex packs the samples into one sequence; the reference runs each sample alone
    unpacked = DataConfig(path=str(data), format="openai", pack_to_max_length=False)
    expected = _reference_loss(model, unpacked, adapter)
    assert figures["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert figures["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert figures["eval_tokens"] > 0 and figures["sequences"] >= 1
    text = run_cli(*[a for a in args if a != "--json"])
    assert f"eval_loss {figures['eval_loss']:.4f}" in text


def test_hold_out_is_fixed_disjoint_and_complete(tmp_path, model):
    from tunex.data import build_dataset
    from tunex.tokenizer import load_tokenizer

    data = make_data(tmp_path / "d", "instruct")
    tok = load_tokenizer(model)
    for packed in (False, True):
        cfg = DataConfig(path=str(data), format="openai", pack_to_max_length=packed, max_length=64)
        splits = []
        for seed in (0, 7):
            full = build_dataset(cfg, tok, seed=seed)
            train_ds, held = evaluate.hold_out(full, cfg, 0.34, seed)
            members = [set(ds.members.tolist()) for ds in (train_ds, held)]
            assert members[0].isdisjoint(members[1]) and members[0] | members[1] == set(range(len(QA)))
            assert len(members[1]) == 2
            splits.append(members[1])
        assert splits[0] == splits[1]  # the held-out records do not depend on train.seed
    with pytest.raises(Exception, match="eval.split"):
        evaluate.hold_out(build_dataset(cfg, tok, seed=0), cfg, 0.95, 0)


def _train_cli(cfg_path, *extra):
    options = [
        "-o",
        "eval.split=0.34",
        "-o",
        "eval.every_n_steps=4",
        "-o",
        'save.best_metric="eval_loss"',
        "-o",
        "save.save_steps=8",
        "-o",
        "save.save_total_limit=1",
    ]
    return run_cli("train", str(cfg_path), *options, *extra)


def test_training_reports_eval_and_keeps_the_best(tmp_path, model):
    data = make_data(tmp_path / "d", "instruct")
    work = tmp_path / "work"
    # a high lr overfits the four training records, so the held-out loss turns up again
    cfg_path = write_config(tmp_path / "c.toml", model, data, "lora", "openai", work, lr=5e-2, max_steps=16)
    out = _train_cli(cfg_path)
    records = read_metrics(work)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert f"[eval step {r['step']}] eval_loss {r['eval_loss']:.4f}" in out
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))
    best_step = min(evals, key=lambda r: r["eval_loss"])["step"]
    info = read_best(work)
    assert info["step"] == best_step and info["metric"] == "eval_loss"
    assert info["value"] == min(r["eval_loss"] for r in evals)
    state = checkpoint.load(work / "best.pth")
    assert state["step"] == best_step
    assert [s for s, _ in checkpoint.checkpoints(work)] == [16]  # best.pth is not an iter_N: never pruned
    # the same figure from `tunex eval` on the config's held-out split with that checkpoint
    cfg_args = [
        "eval",
        str(cfg_path),
        "--adapter",
        str(work / "best.pth"),
        "--json",
        "-o",
        "eval.split=0.34",
    ]
    figures = json.loads(run_cli(*cfg_args).strip().splitlines()[-1])
    assert figures["eval_loss"] == pytest.approx(info["value"], rel=1e-5)


def test_resume_keeps_eval_lines_and_best(tmp_path, model):
    data = make_data(tmp_path / "d", "instruct")
    runs = {}
    for name in ("whole", "cut"):
        work = tmp_path / name
        cfg_path = write_config(tmp_path / f"{name}.toml", model, data, "lora", "openai", work, lr=5e-2, max_steps=16)
        if name == "cut":
            _train_cli(cfg_path, "--max-steps", "9")  # evaluated at 4, 8 and at the stop (9)
            assert read_best(work)["step"] in (4, 8, 9)
            _train_cli(cfg_path, "--resume", "auto")  # from iter_9
        else:
            _train_cli(cfg_path)
        runs[name] = ([r for r in read_metrics(work) if "eval_loss" in r], read_best(work))
    whole, cut = runs["whole"], runs["cut"]
    assert [r["step"] for r in whole[0]] == [4, 8, 12, 16]
    assert [r["step"] for r in cut[0]] == [4, 8, 9, 12, 16]  # the stopped run was evaluated at its stop
    by_step = {r["step"]: r for r in cut[0]}
    for a in whole[0]:
        assert a["eval_loss"] == pytest.approx(by_step[a["step"]]["eval_loss"], rel=1e-5)
    if cut[1]["step"] != 9:  # the best survived the resume, and is the uninterrupted run's
        assert cut[1] == whole[1]


def test_at_start_evaluates_the_starting_model_once(tmp_path, model):
    """eval.at_start: a step-0 evaluation of the starting model (the figure `tunex eval` gives the
    base model), answers at step 0, no checkpoint or best for it, the run's steps unchanged, and a
    resumed run does not evaluate step 0 again."""
    data = make_data(tmp_path / "d", "instruct")
    runs, outputs = {}, {}
    for name in ("plain", "start", "cut"):
        work = tmp_path / name
        cfg_path = write_config(tmp_path / f"{name}.toml", model, data, "lora", "openai", work, lr=5e-2, max_steps=8)
        extra = [] if name == "plain" else ["-o", "eval.at_start=true"]
        if name == "cut":
            outputs[name] = _train_cli(cfg_path, *extra, "--max-steps", "4")
            outputs[name] += _train_cli(cfg_path, *extra, "--resume", "auto")
        else:
            outputs[name] = _train_cli(cfg_path, *extra)
        runs[name] = read_metrics(work)
    evals = {name: [r for r in records if "eval_loss" in r] for name, records in runs.items()}
    assert [r["step"] for r in evals["plain"]] == [4, 8]
    assert [r["step"] for r in evals["start"]] == [0, 4, 8]
    assert [r["step"] for r in evals["cut"]] == [0, 4, 8]
    assert outputs["cut"].count("[eval step 0] eval_loss") == 1
    start = evals["start"][0]
    assert f"[eval step 0] eval_loss {start['eval_loss']:.4f}" in outputs["start"]
    # the baseline is the untrained model's: `tunex eval` of the config without an adapter
    cfg_args = ["eval", str(tmp_path / "start.toml"), "--json", "-o", "eval.split=0.34"]
    figures = json.loads(run_cli(*cfg_args).strip().splitlines()[-1])
    assert start["eval_loss"] == pytest.approx(figures["eval_loss"], rel=1e-5)
    assert start["eval_tokens"] == figures["eval_tokens"]
    end = evals["start"][-1]  # `tunex train` ends with how the held-out figures moved
    assert (
        f"held-out loss {start['eval_loss']:.2f} -> {end['eval_loss']:.2f}, perplexity "
        f"{start['eval_perplexity']:.1f} -> {end['eval_perplexity']:.1f} (step 0 -> step 8, "
        f"{end['eval_tokens']:,} target tokens)"
    ) in outputs["start"]
    # evaluating first changes nothing of the run: the same steps, losses and later figures
    steps = {name: [(r["step"], r["loss"]) for r in records if "loss" in r] for name, records in runs.items()}
    assert steps["start"] == steps["plain"] and [s for s, _ in steps["start"]] == list(range(1, 9))
    for later, plain in zip(evals["start"][1:], evals["plain"]):
        assert later["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
    for name in ("start", "cut"):
        answers = [json.loads(line) for line in (tmp_path / name / "eval.jsonl").read_text().splitlines()]
        assert [a["step"] for a in answers] == [0, 4, 8] and answers[0]["prompt"] == QA[0][0]
        assert read_best(tmp_path / name)["step"] in (4, 8)  # step 0 has no checkpoint: never the best
        assert not (tmp_path / name / "iter_0.pth").exists()
    with pytest.raises(ConfigError, match="eval.at_start: expected true or false, got 'yes'"):
        load_config(tmp_path / "plain.toml", ['eval.at_start="yes"'])


def test_change_line():
    rec = [{"step": 1, "loss": 3.0}, {"step": 0, "eval_loss": 2.0, "eval_perplexity": math.exp(2.0)}]
    assert evaluate.change_line(rec) is None  # one evaluation: nothing moved
    rec.append({"step": 9, "eval_loss": 1.0, "eval_perplexity": math.exp(1.0), "eval_tokens": 1234})
    assert evaluate.change_line(rec) == (
        "held-out loss 2.00 -> 1.00, perplexity 7.4 -> 2.7 (step 0 -> step 9, 1,234 target tokens)"
    )
    rec.append({"step": 10, "eval_loss": 900.0, "eval_perplexity": math.inf})
    assert evaluate.change_line(rec).startswith(
        "held-out loss 2.00 -> 900.00, perplexity 7.4 -> inf (step 0 -> step 10)"
    )
    pairs = [{"step": 0, "eval_loss": 0.6931, "eval_rewards/accuracies": 0.5, "eval_pairs": 8}]
    pairs.append({"step": 6, "eval_loss": 0.2, "eval_rewards/accuracies": 0.875, "eval_pairs": 8})
    assert evaluate.change_line(pairs) == (
        "held-out loss 0.693 -> 0.200, reward accuracy 0.500 -> 0.875 (step 0 -> step 6, 8 pairs)"
    )


def test_eval_config_errors(tmp_path, model):
    data = make_data(tmp_path / "d", "instruct")
    cfg_path = write_config(tmp_path / "c.toml", model, data, "lora", "openai", tmp_path / "w")
    bad = {
        "eval.split=1.0": "eval.split: expected a number >= 0 and < 1",
        "eval.split=-0.1": "eval.split: expected",
        'eval.format="csv"': "eval.format: expected one of",
        "eval.data=3": "eval.data: expected",
        "eval.batch_size=-1": "eval.batch_size: expected an integer >= 0",
        'save.best_metric="loss"': "save.best_metric: expected one of",
        'save.best_metric="eval_loss"': "save.best_metric: 'eval_loss' needs a held-out evaluation",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_config(cfg_path, [override])
    with pytest.raises(ConfigError, match="eval.split: expected 0 when eval.data is set"):
        load_config(cfg_path, [f'eval.data="{data}"', "eval.split=0.2"])
    cfg = load_config(cfg_path, [f'eval.data="{data}"', 'save.best_metric="eval_perplexity"'])
    assert cfg.eval.data == str(data) and cfg.save.best_metric == "eval_perplexity"
    assert set(BEST_METRICS) - {""} == set(evaluate.BEST_METRICS)


def test_eval_data_in_another_format(tmp_path, model):
    """eval.data in a format of its own (alpaca) beside openai training data."""
    data = make_data(tmp_path / "d", "instruct")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA[:2]))
    work = tmp_path / "w"
    cfg_path = write_config(tmp_path / "c.toml", model, data, "lora", "openai", work, max_steps=4)
    overrides = [f'eval.data="{held}"', 'eval.format="alpaca"', "eval.every_n_steps=2"]
    train(load_config(cfg_path, overrides))
    evals = [r for r in read_metrics(work) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    args = ["eval", str(cfg_path), "--adapter", str(work / "iter_4.pth"), "--json"]
    for o in overrides:
        args += ["-o", o]
    figures = json.loads(run_cli(*args).strip().splitlines()[-1])
    assert figures["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)


def test_eval_command_errors(tmp_path, model):
    data = make_data(tmp_path / "d", "instruct")
    cfg_path = write_config(tmp_path / "c.toml", model, data, "lora", "openai", tmp_path / "w", max_steps=1)
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(model)])
    assert result.exit_code == 2 and "--data is needed when CFG_OR_MODEL is a model" in result.output
    result = runner.invoke(cli, ["eval", str(cfg_path)])
    assert result.exit_code == 2 and "sets neither eval.data nor eval.split: give --data" in result.output
    train(load_config(cfg_path))
    result = runner.invoke(
        cli, ["eval", str(model), "--data", str(data), "--adapter", str(tmp_path / "w" / "iter_1.pth")]
    )
    assert result.exit_code == 2 and "a training checkpoint needs the config that trained it" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(cli, ["eval", str(model), "--data", str(empty), "--format", "openai"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "empty.jsonl" in result.output


def test_eval_qlora_config_with_its_exported_adapter(tmp_path, model):
    """A QLoRA run's PEFT export evaluated through the config sits on the same 4-bit base as the
    training checkpoint: the same figure either way."""
    pytest.importorskip("tunex.quant")
    data = make_data(tmp_path / "d", "instruct")
    work = tmp_path / "w"
    cfg_path = write_config(tmp_path / "c.toml", model, data, "qlora", "openai", work, max_steps=3, lr=2e-2)
    train(load_config(cfg_path))
    run_cli("convert", "pth_to_hf", str(cfg_path), str(work / "iter_3.pth"), str(tmp_path / "adapter"), "--fp32")
    base = ["eval", str(cfg_path), "--data", str(data), "--json"]
    by_pth = json.loads(run_cli(*base, "--adapter", str(work / "iter_3.pth")).strip().splitlines()[-1])
    by_peft = json.loads(run_cli(*base, "--adapter", str(tmp_path / "adapter")).strip().splitlines()[-1])
    assert by_peft["eval_loss"] == pytest.approx(by_pth["eval_loss"], rel=1e-4)
