"""Multimodal data (LLaVA JSON, openai image parts) and the two training stages on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _llava_helpers import llava_config, make_shapes, make_tower
from test_train_helpers import make_tiny_model
from tunex.config import load_config
from tunex.data.multimodal import image_spans, read_image_data
from tunex.errors import ConfigError, DataError
from tunex.templates import get_template
from tunex.tokenizer import load_tokenizer
from tunex.train import checkpoint
from tunex.train.loop import train
from tunex.train.metrics import read_metrics
from tunex.train.multimodal import build_image_dataset, build_image_datasets

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {"llm": make_tiny_model(root / "llm"), "tower": make_tower(root / "tower"), "root": root}


def _cfg(tmp_path, parts, stage="finetune", fmt="llava", n=6, **extra):
    data, truths = make_shapes(tmp_path / "d", n, fmt=fmt)
    path = llava_config(
        tmp_path / "c.toml", parts["llm"], parts["tower"], data, tmp_path / "w", stage, **{"data.format": fmt, **extra}
    )
    return load_config(path), truths


@pytest.mark.parametrize("fmt", ["llava", "openai"])
def test_image_tokens_are_never_targets(tmp_path, parts, fmt):
    cfg, truths = _cfg(tmp_path, parts, fmt=fmt)
    tok = load_tokenizer(parts["llm"])
    image_id = len(tok)
    data = read_image_data(cfg.data, tok, get_template("auto", tok), image_id, 16)
    assert data.stats["samples"] == 6 and data.stats["images"] == 6
    for sample, truth in zip(data.samples, truths):
        assert image_spans(sample.ids, image_id) == [(s, s + 16) for s, _ in image_spans(sample.ids, image_id)]
        assert int((sample.ids == image_id).sum()) == 16
        assert not (sample.labels[sample.ids == image_id] != -100).any()
        target = tok.decode(sample.labels[sample.labels != -100].tolist())
        reply = truth["colour"] if truth["kind"] == "colour" else truth["shape"]
        assert target.startswith(reply), target
        assert sample.images == [str(truth["image"])]


def test_packed_items_carry_their_images_in_order(tmp_path, parts):
    cfg, _ = _cfg(tmp_path, parts, n=8, **{"data.pack_to_max_length": True, "data.max_length": 128})
    ds = build_image_dataset(cfg, load_tokenizer(parts["llm"]))
    assert ds.packed and len(ds) < 8
    image_id = len(load_tokenizer(parts["llm"]))
    for i in range(len(ds)):
        item = ds[i]
        parts_ = ds.samples(i)
        assert item["pixel_values"].shape == (len(parts_), 3, 32, 32)
        assert int((item["input_ids"] == image_id).sum()) == 16 * len(parts_)
        starts = (item["position_ids"] == 0).nonzero().flatten().tolist()
        assert starts == list(np.cumsum([0] + [len(s.ids) for s in parts_[:-1]]))


def test_missing_and_broken_images(tmp_path, parts):
    cfg, truths = _cfg(tmp_path, parts)
    truths[2]["image"].unlink()
    truths[4]["image"].write_bytes(b"not a png")
    tok = load_tokenizer(parts["llm"])
    with pytest.raises(
        DataError, match=r"data.json, line \d+, record 2: image .*img_0_2.png: image file not found.*skip_bad"
    ):
        read_image_data(cfg.data, tok, get_template("auto", tok), len(tok), 16)
    cfg.data.skip_bad_images = True
    data = read_image_data(cfg.data, tok, get_template("auto", tok), len(tok), 16)
    assert data.stats["bad_images"] == 2 and data.stats["samples"] == 4


def test_vision_config_checks(tmp_path, parts):
    with pytest.raises(ConfigError, match="data.format: expected 'llava' or 'openai'"):
        _cfg(tmp_path, parts, **{"data.format": "alpaca"})
    with pytest.raises(ConfigError, match="vision.stage: the pretrain stage trains the projector alone"):
        _cfg(tmp_path, parts, stage="pretrain", **{"vision.tower_lora": True})
    with pytest.raises(ConfigError, match="vision.projector: expected one of"):
        _cfg(tmp_path, parts, **{"vision.projector": "mlp3x"})
    with pytest.raises(ConfigError, match=r"train.sequence_parallel: expected 1 for \[vision\] runs"):
        _cfg(tmp_path, parts, **{"train.sequence_parallel": 2})
    with pytest.raises(ConfigError, match=r"eval.format: expected 'llava', 'openai' or empty"):
        _cfg(tmp_path, parts, **{"eval.data": "x.json", "eval.format": "alpaca"})
    from click.testing import CliRunner
    from tunex.cli import cli

    _cfg(tmp_path, parts, **{"eval.split": 0.25})
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "c.toml")])
    assert result.exit_code == 2 and "held-out loss is measured while it trains" in result.output


def test_pretrain_then_finetune(tmp_path, parts):
    cfg, _ = _cfg(tmp_path / "pre", parts, stage="pretrain", **{"train.max_steps": 6})
    result = train(cfg)
    state = torch.load(result.checkpoint, weights_only=True)
    assert sorted(state["model"]) == [
        "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "multi_modal_projector.linear_2.weight",
    ]
    losses = [r["loss"] for r in read_metrics(result.work_dir)]
    assert len(losses) == 6 and all(np.isfinite(losses))

    cfg2, _ = _cfg(
        tmp_path / "fine",
        parts,
        **{"vision.projector_checkpoint": str(result.work_dir), "vision.tower_lora": True, "train.max_steps": 3},
    )
    result2 = train(cfg2)
    state2 = torch.load(result2.checkpoint, weights_only=True)["model"]
    assert any(k.startswith("language_model.") and "lora_A" in k for k in state2)
    assert any(k.startswith("vision_tower.") and "lora_B" in k for k in state2)
    assert not any(k.startswith("vision_tower.") and "lora" not in k for k in state2)
    # the finetune stage started from the pretrained projector (and trained it further)
    first = torch.load(checkpoint.latest(result.work_dir), weights_only=True)["model"]
    assert not torch.equal(
        first["multi_modal_projector.linear_1.weight"], state2["multi_modal_projector.linear_1.weight"]
    )
    cfg_json = json.loads(json.dumps(torch.load(result2.checkpoint, weights_only=True)["config"]["vision"]))
    assert cfg_json["stage"] == "finetune" and cfg_json["tower_lora"] is True


def test_finetune_needs_a_projector_checkpoint_that_exists(tmp_path, parts):
    from tunex.errors import TunexError

    cfg, _ = _cfg(tmp_path, parts, **{"vision.projector_checkpoint": str(tmp_path / "nothing")})
    with pytest.raises(TunexError, match="has no iter_N.pth; run the pretrain stage first"):
        train(cfg)


def test_check_custom_dataset_and_log_dataset_show_image_spans(tmp_path, parts):
    from click.testing import CliRunner
    from tunex.cli import cli

    _cfg(tmp_path, parts)
    runner = CliRunner()
    result = runner.invoke(cli, ["check-custom-dataset", str(tmp_path / "c.toml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "16 tokens per image" in result.output and "every record is valid" in result.output
    assert "image token spans (1; labels -100 there)" in result.output and "img_0_0.png" in result.output
    assert "<image: 16 tokens at " in result.output
    result = runner.invoke(cli, ["log-dataset", str(tmp_path / "c.toml"), "-n", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("<image: 16 tokens at ") == 4  # text and masked_text of 2 items
    assert "[[" in result.output and ".png" in result.output


def test_qlora_finetune_exports_a_dense_llava(tmp_path, parts):
    pytest.importorskip("tunex.quant")
    from tunex.models.llava import load_llava
    from tunex.train.export import convert_checkpoint

    cfg, _ = _cfg(
        tmp_path,
        parts,
        **{"method.kind": "qlora", "method.blocksize": 32, "method.compute_dtype": "float32", "train.max_steps": 2},
    )
    result = train(cfg)
    out = tmp_path / "hf"
    convert_checkpoint(cfg, result.checkpoint, out, fp32=True)
    model = load_llava(out)
    lora = {k: v for k, v in torch.load(result.checkpoint, weights_only=True)["model"].items() if "lora_" in k}
    assert lora and (out / "llm_adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 2, 3] + [model.image_token_id] * 16 + [4, 5]])
    with torch.no_grad():
        logits = model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 21, model.language_model.lm_head.weight.shape[0]) and torch.isfinite(logits).all()


def test_check_image_catches_truncated_jpegs(tmp_path):
    from PIL import Image
    from tunex.data.multimodal import check_image

    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "a.jpg", quality=90)
    raw = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(raw[: len(raw) // 2])
    assert check_image(tmp_path / "a.jpg") is None
    assert "truncated" in check_image(tmp_path / "b.jpg")
    assert check_image(tmp_path / "none.jpg") == "image file not found"


def _oracle_eval(cfg, state, items) -> tuple[float, int]:
    """(mean target-token NLL, target tokens) of ``items`` under the run's model with the checkpoint's
    trainable state, from the model's full logits and torch's cross-entropy, one item at a time."""
    from tunex.train.build import build_model
    from tunex.train.loop import load_trainable

    model = build_model(cfg, torch.device("cpu"))
    load_trainable(model, state, "iter")
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            logits = model(item["input_ids"][None], item["position_ids"][None], pixel_values=item["pixel_values"])
            y = item["labels"][1:]
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], y, reduction="sum", ignore_index=-100))
            count += int((y != -100).sum())
    return nll / count, count


def test_held_out_split_is_fixed_disjoint_and_evaluated(tmp_path, parts):
    """eval.split holds out whole samples (the same whatever train.seed), never trained on; the
    loop's eval_loss at the end equals the model's own full-logits loss on them, and the one at step
    0 (eval.at_start) is the baseline the run improves on."""
    from tunex.data.images import pixel_values

    extra = {"eval.split": 0.34, "eval.at_start": True, "train.max_steps": 3, "data.pack_to_max_length": True}
    cfg, _ = _cfg(tmp_path, parts, n=6, **{**extra, "data.max_length": 128})
    tok = load_tokenizer(parts["llm"])
    every = [s.images[0] for s in build_image_dataset(cfg, tok).data.samples]
    splits = []
    for seed in (0, 7):
        cfg.train.seed = seed
        trained, held = build_image_datasets(cfg, tok)
        splits.append(sorted(p for i in range(len(held)) for p in held.images(i)))
        trained_images = [p for i in range(len(trained)) for p in trained.images(i)]
        assert len(splits[-1]) == 2 and not set(splits[-1]) & set(trained_images)
        assert sorted(splits[-1] + trained_images) == sorted(every)
    assert splits[0] == splits[1]
    cfg.train.seed = 0
    result = train(cfg)
    evals = [r for r in read_metrics(result.work_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    _, held = build_image_datasets(cfg, tok)
    items = [
        {
            "input_ids": torch.from_numpy(s.ids),
            "labels": torch.from_numpy(s.labels),
            "position_ids": torch.arange(len(s.ids)),
            "pixel_values": pixel_values(s.images, held.processing, held.aspect),
        }
        for i in range(len(held))
        for s in held.samples(i)
    ]
    state = torch.load(result.checkpoint, weights_only=True)["model"]
    loss, tokens = _oracle_eval(cfg, state, items)
    assert evals[-1]["eval_tokens"] == tokens == evals[0]["eval_tokens"]
    assert abs(evals[-1]["eval_loss"] - loss) <= 1e-4 * max(1.0, loss), (evals[-1], loss)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_eval_data_of_a_vision_run(tmp_path, parts):
    """eval.data: its own records and images, read as the training data is; every sample evaluated."""
    held_data, truths = make_shapes(tmp_path / "held", 3, seed=5)
    records = json.loads(held_data.read_text())
    for record, truth in zip(records, truths):  # data.image_folder is the training data's
        record["image"] = str(truth["image"])
    held_data.write_text(json.dumps(records))
    cfg, _ = _cfg(tmp_path, parts, **{"eval.data": str(held_data), "train.max_steps": 2})
    tok = load_tokenizer(parts["llm"])
    trained, held = build_image_datasets(cfg, tok)
    assert len(trained) == 6 and len(held) == 3
    assert all(p.startswith(str(tmp_path / "held")) for i in range(3) for p in held.images(i))
    result = train(cfg)
    (scores,) = [r for r in read_metrics(result.work_dir) if "eval_loss" in r]
    want = sum(int((held.arrays(i)[1][1:] != -100).sum()) for i in range(3))
    assert scores["step"] == 2 and scores["eval_tokens"] == want and np.isfinite(scores["eval_loss"])


def test_two_processes_train_the_lone_curve(tmp_path, parts):
    """torchrun with 2 gloo processes (DDP over the projector and the LLM's and tower's adapters) trains
    the one-process curve of the same global batch: losses, gradient norms, held-out losses and the
    final trainable weights. One record has no image, so some micro-batches leave the projector unused."""
    from test_dist import TOL, assert_same_curve, torchrun

    cfg, _ = _cfg(tmp_path, parts, n=8)
    data = tmp_path / "d" / "data.json"
    records = json.loads(data.read_text())
    turns = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]
    data.write_text(json.dumps([{"id": "text", "conversations": turns}, *records]))  # trained on (not held out)
    settings = {"vision.tower_lora": True, "train.max_steps": 3, "train.batch_size": 1, "eval.split": 0.25}
    path = llava_config(tmp_path / "c.toml", parts["llm"], parts["tower"], data, tmp_path / "w", "finetune", **settings)
    lone = train(load_config(path, ["train.grad_accum=4"]), work_dir=str(tmp_path / "one"))
    torchrun(str(path), "--work-dir", str(tmp_path / "two"), "-o", "train.grad_accum=2")
    one, two = read_metrics(lone.work_dir), read_metrics(tmp_path / "two")
    assert_same_curve([r for r in one if "loss" in r], [r for r in two if "loss" in r], [1, 2, 3])
    held_one, held_two = ([r for r in m if "eval_loss" in r] for m in (one, two))
    assert [r["step"] for r in held_two] == [3] and held_one[0]["eval_tokens"] == held_two[0]["eval_tokens"]
    assert abs(held_one[0]["eval_loss"] - held_two[0]["eval_loss"]) <= TOL * max(1.0, held_one[0]["eval_loss"])
    want = torch.load(lone.checkpoint, weights_only=True)["model"]
    got = torch.load(tmp_path / "two" / "iter_3.pth", weights_only=True)
    assert got["world_size"] == 2 and set(got["model"]) == set(want)
    assert any(k.startswith("vision_tower.") for k in want) and any(k.startswith("multi_modal") for k in want)
    for k, v in want.items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5)
