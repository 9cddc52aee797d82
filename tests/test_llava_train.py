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
from tunex.train.multimodal import build_image_dataset

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
    with pytest.raises(ConfigError, match=r"held-out evaluation of \[vision\] runs is not supported yet"):
        _cfg(tmp_path, parts, **{"eval.split": 0.1})


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
