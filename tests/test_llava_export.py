"""`convert pth_to_hf` of a multimodal run: the folder transformers' LLaVA and AutoProcessor load,
`tunex chat --image` on it, and `convert merge --is-clip` of the tower's adapter."""

from __future__ import annotations

import json

import pytest
import torch
from _llava_helpers import QUESTIONS, llava_config, make_shapes, make_tower
from click.testing import CliRunner
from test_train_helpers import make_tiny_model
from tunex.cli import cli
from tunex.config import load_config
from tunex.models.generate import generate
from tunex.models.llava import load_llava
from tunex.models.llava_generate import expand_image_tokens, folder_processing, with_image_placeholders
from tunex.templates import get_template
from tunex.tokenizer import load_tokenizer
from tunex.train.loop import train

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_export")
    llm, tower = make_tiny_model(root / "llm", tied=False), make_tower(root / "tower")
    data, truths = make_shapes(root / "d", 8)
    cfg_path = llava_config(
        root / "c.toml",
        llm,
        tower,
        data,
        root / "w",
        "finetune",
        **{"vision.tower_lora": True, "train.max_steps": 3, "vision.image_aspect": "pad"},
    )
    result = train(load_config(cfg_path))
    out = root / "hf"
    text = run_cli("convert", "pth_to_hf", str(cfg_path), str(result.checkpoint), str(out), "--fp32")
    assert "LLaVA" in text
    return {"out": out, "tower": tower, "image": truths[0]["image"], "root": root}


def _prompt(folder) -> str:
    tok = load_tokenizer(folder)
    template = get_template("auto", tok)
    text = with_image_placeholders(QUESTIONS["colour"], 1)
    return template.render([{"role": "user", "content": text}], add_generation_prompt=True)


def test_transformers_loads_and_matches(exported):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = exported["out"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    hf = LlavaForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    ours = load_llava(out)
    tok = load_tokenizer(out)
    prompt = _prompt(out)
    image = Image.open(exported["image"])
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    # the same tokens (each <image> expanded to the tower's patches) and the same pixels
    ids = expand_image_tokens(tok.encode(prompt, add_special_tokens=False), ours.image_token_id, ours.image_tokens)
    assert inputs["input_ids"][0].tolist() == ids
    processing, aspect = folder_processing(out)
    assert aspect == "pad"
    from tunex.data.images import preprocess

    torch.testing.assert_close(inputs["pixel_values"][0], torch.from_numpy(preprocess(image, processing, aspect)))
    with torch.no_grad():
        want = hf(**inputs).logits
        got = ours(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # greedy generation: token for token
    new = hf.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)
    hf_ids = new[0, inputs["input_ids"].shape[1] :].tolist()
    ours_ids = generate(ours.with_images(inputs["pixel_values"]), ids, max_new_tokens=12, temperature=0)
    assert ours_ids == hf_ids


def test_chat_with_image(exported):
    from tunex.models.generate import GenerationConfig
    from tunex.models.llava_generate import generate_llava_text

    out = exported["out"]
    text = run_cli(
        "chat",
        str(out),
        "--image",
        str(exported["image"]),
        "--prompt",
        QUESTIONS["colour"],
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--no-streamer",
    )
    model, tok = load_llava(out), load_tokenizer(out)
    processing, aspect = folder_processing(out)
    from tunex.data.images import pixel_values

    pixels = pixel_values([exported["image"]], processing, aspect)
    template = get_template("auto", tok)
    settings = GenerationConfig(max_new_tokens=6, temperature=0, stop_words=template.stop_words)
    want = generate_llava_text(model, tok, _prompt(out), pixels, settings)
    assert text.strip() == want.strip()
    result = CliRunner().invoke(cli, ["chat", str(exported["tower"]), "--image", str(exported["image"])])
    assert result.exit_code != 0 and "is not a LLaVA folder" in result.output


def test_adapters_and_merge_is_clip(exported):
    from safetensors.torch import load_file, save_file
    from tunex.models.vision import load_vision_tower

    out, root = exported["out"], exported["root"]
    assert (out / "llm_adapter" / "adapter_config.json").is_file()
    adapter = out / "visual_encoder_adapter"
    keys = load_file(adapter / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.vision_model.encoder.layers.") for k in keys)
    # a CLIP checkpoint as the hub has them (vision_model.* names) to merge into
    clip = root / "clip"
    clip.mkdir()
    state = load_file(exported["tower"] / "model.safetensors")
    save_file({"vision_model." + k: v for k, v in state.items()}, clip / "model.safetensors", {"format": "pt"})
    for name in ("config.json", "preprocessor_config.json"):
        (clip / name).write_bytes((exported["tower"] / name).read_bytes())
    merged = root / "merged_clip"
    run_cli("convert", "merge", str(clip), str(adapter), str(merged), "--is-clip", "-q")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = load_llava(out).vision_tower.features(pixels)
        got = load_vision_tower(merged).features(pixels)
        before = load_vision_tower(clip).features(pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, want, atol=1e-4)  # the adapter changed the tower
