"""Vision towers (CLIP ViT, SigLIP) and image preprocessing against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tunex.data import images as I
from tunex.errors import DataError, FormatError
from tunex.models.vision import load_vision_tower, read_vision_config

pytest.importorskip("transformers")

TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,  # head dim 16
    image_size=32,
    patch_size=8,
)


def clip_vision(tmp_path, whole: bool = False):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(**TOWER)
    if whole:
        cfg = CLIPConfig(
            vision_config=vcfg.to_dict(),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            projection_dim=16,
        )
        model = CLIPModel(cfg).eval()
        tower = model.vision_model
    else:
        model = CLIPVisionModel(vcfg).eval()
        tower = getattr(model, "vision_model", model)  # transformers 5: the model is the tower
    _randomize(model)
    model.save_pretrained(tmp_path)
    return tower


def siglip_vision(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TOWER)).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    return getattr(model, "vision_model", model)


def _randomize(model: torch.nn.Module) -> None:
    """Norm weights and biases off their 1/0 init, so a swapped or skipped norm shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)


def _hf_states(tower, pixels):
    with torch.no_grad():
        return tower(pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("kind", ["clip_vision", "clip_whole", "siglip"])
def test_tower_features_match_transformers(tmp_path, kind):
    hf = siglip_vision(tmp_path) if kind == "siglip" else clip_vision(tmp_path, whole=kind == "clip_whole")
    ours = load_vision_tower(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    states = _hf_states(hf, pixels)
    for select in (-2, -1, 0, 1):
        want = states[select]
        if kind != "siglip":
            want = want[:, 1:]  # patch tokens without CLS
        with torch.no_grad():
            got = ours.features(pixels, select)
        assert got.shape == (2, 16, 32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if kind != "siglip":
        with torch.no_grad():
            full = ours.features(pixels, -2, keep_class=True)
        torch.testing.assert_close(full, states[-2], rtol=1e-5, atol=1e-5)


def test_tower_select_layer_out_of_range(tmp_path):
    clip_vision(tmp_path)
    tower = load_vision_tower(tmp_path)
    with pytest.raises(ValueError, match="select_layer 4"):
        tower.features(torch.randn(1, 3, 32, 32), 4)
    with pytest.raises(ValueError, match="pixel_values of shape"):
        tower.features(torch.randn(1, 3, 16, 16))


def test_tower_bad_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FormatError, match="not a vision tower"):
        read_vision_config(tmp_path)
    clip_vision(tmp_path / "c")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "c" / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.endswith("post_layernorm.weight")}
    save_file(state, tmp_path / "c" / "model.safetensors")
    with pytest.raises(FormatError, match="lacks 1 tensors.*post_layernorm"):
        load_vision_tower(tmp_path / "c")


# ---- preprocessing --------------------------------------------------------------------------------


def _images():
    rng = np.random.default_rng(0)
    yield Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))  # wide
    yield Image.fromarray(rng.integers(0, 256, (61, 29, 3), dtype=np.uint8))  # tall
    yield Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")  # small, transparent
    yield Image.fromarray(rng.integers(0, 256, (45, 33), dtype=np.uint8), "L")  # grey


PROCESSORS = {
    "clip": dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}),
    "siglip": dict(size={"height": 24, "width": 24}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3),
}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocess_matches_transformers(kind):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    hf = (CLIPImageProcessorPil if kind == "clip" else SiglipImageProcessorPil)(**PROCESSORS[kind])
    ours = I.processing_from_dict(hf.to_dict())
    for img in _images():
        want = hf(images=img, return_tensors="np")["pixel_values"][0]
        got = I.preprocess(img, ours)
        assert got.dtype == np.float32 and got.shape == want.shape == (3, 24, 24)
        np.testing.assert_array_equal(got, want)


def test_pad_to_square_matches_llava_processor():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    hf = LlavaImageProcessorPil(do_pad=True, **PROCESSORS["clip"])
    ours = I.processing_from_dict(hf.to_dict())
    for img in _images():
        want = hf(images=img, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(I.preprocess(img, ours, aspect="pad"), want)
    # a wide image keeps its sides with pad, loses them to the crop without
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    padded, cropped = I.preprocess(wide, ours, "pad"), I.preprocess(wide, ours, "resize")
    assert not np.allclose(padded[:, 0], padded[:, 12])  # top row is background, middle is red
    np.testing.assert_allclose(cropped[:, 0], cropped[:, 12])


def test_read_processing_and_bad_images(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 8}, "crop_size": 8}))
    p = I.read_processing(tmp_path)
    assert (p.shortest_edge, p.crop_height, p.crop_width) == (8, 8, 8)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(FormatError, match="image_mean: expected 3 numbers"):
        I.read_processing(tmp_path)
    with pytest.raises(DataError, match="nope.png: image file not found"):
        I.open_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png: not an image"):
        I.open_image(tmp_path / "bad.png")
    Image.new("RGB", (9, 7), (1, 2, 3)).save(tmp_path / "ok.png")
    values = I.pixel_values([tmp_path / "ok.png"] * 2, p)
    assert values.shape == (2, 3, 8, 8) and values.dtype == torch.float32
