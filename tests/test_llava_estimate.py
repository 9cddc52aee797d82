"""`tunex estimate` of a [vision] config: tower, projector and image tokens, counted against the modules."""

from __future__ import annotations

import json

import pytest
import torch
from _llava_helpers import llava_config, make_shapes, make_tower
from click.testing import CliRunner
from test_train_helpers import make_tiny_model
from tunex import builtin_configs
from tunex.cli import cli
from tunex.estimate_vision import PRESETS, projector_params, tower_adapter_params, tower_params
from tunex.models.llava import Projector
from tunex.models.vision import VisionTower, vision_config_from_hf
from tunex.peft import apply_lora

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(PRESETS))
def test_tower_counts_match_transformers(name):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    raw = dict(PRESETS[name])
    kind = raw.pop("model_type")
    cls, config = (
        (CLIPVisionModel, CLIPVisionConfig) if kind == "clip_vision_model" else (SiglipVisionModel, SiglipVisionConfig)
    )
    with torch.device("meta"):
        hf = cls(config(**raw))
    want = sum(p.numel() for n, p in hf.named_parameters() if ".head." not in f".{n}")  # SigLIP's pooling head
    assert tower_params(vision_config_from_hf(PRESETS[name])) == want


def test_projector_and_tower_adapter_counts():
    v = vision_config_from_hf(PRESETS["clip-vit-large-patch14"])
    for kind in ("mlp2x_gelu", "linear"):
        with torch.device("meta"):
            module = Projector(kind, 1024, 4096)
        assert projector_params(kind, 1024, 4096) == sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        tower = VisionTower(v)
        apply_lora(tower, "all-linear", 8, 16)
    assert tower_adapter_params(v, 8) == sum(p.numel() for p in tower.parameters() if p.requires_grad)


def test_estimate_cli_counts_the_vision_parts(tmp_path):
    llm, tower = make_tiny_model(tmp_path / "llm"), make_tower(tmp_path / "tower")
    data, _ = make_shapes(tmp_path / "d", 2)
    cfg = llava_config(tmp_path / "c.toml", llm, tower, data, tmp_path / "w", "finetune", **{"vision.tower_lora": True})
    result = CliRunner().invoke(cli, ["estimate", str(cfg), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["vision"]["image_tokens"] == 16 and out["vision"]["tower_adapter_params"] > 0
    assert out["parts"]["projector + grads + AdamW"] == 16 * out["vision"]["projector_params"]
    text = CliRunner().invoke(cli, ["estimate", str(cfg)], catch_exceptions=False).output
    assert "16 image tokens per image" in text and "CLIP tower, 2 layers" in text


def test_shipped_llava_configs_estimate_from_built_in_shapes():
    names = [n for n in builtin_configs.names() if n.startswith("llava_internlm2")]
    assert len(names) == 2
    for name in names:
        result = CliRunner().invoke(cli, ["estimate", name, "--preset", "internlm2-7b"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "576 image tokens per image" in result.output and "303.5 M params" in result.output
