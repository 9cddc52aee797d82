"""tunex.merge against PEFT's merge_and_unload on tiny random Llama models made here, and
transformers loading the merged folder with the PEFT model's logits. (transformers and peft are
test oracles only.)"""

from __future__ import annotations

import pytest
import torch
import tunex
from tunex.io import load_state_dict

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 2, 33, 60, 7, 12]])


def tiny_llama(dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=67,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def make_adapter(tmp_path, dtype, **lora_kwargs):
    """Base folder, adapter folder (random non-zero B / magnitudes), and the PEFT model."""
    model = tiny_llama(dtype)
    model.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora_kwargs)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    return pm.eval()


def merged_reference(pm) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


VARIANTS = {
    "lora": dict(target_modules="all-linear"),
    "rslora_patterns": dict(
        target_modules="all-linear",
        use_rslora=True,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3},
    ),
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "dora_embedding": dict(target_modules=["embed_tokens", "o_proj"], use_dora=True),
    "embedding_and_modules_to_save": dict(target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_merge_equals_peft_and_transformers_logits_match(tmp_path, variant):
    pm = make_adapter(tmp_path, torch.float32, **VARIANTS[variant])
    with torch.no_grad():
        peft_logits = pm(IDS).logits
    ref = merged_reference(pm)
    report = tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert report.merged >= 1
    got = load_state_dict(tmp_path / "out")
    assert set(got) == set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, peft_logits, rtol=1e-4, atol=1e-4)


def test_bf16_merge_is_within_a_rounding_step_of_peft_and_shards_load(tmp_path):
    pm = make_adapter(tmp_path, torch.bfloat16, target_modules="all-linear")
    with torch.no_grad():
        peft_logits = pm(IDS).logits.float()
    ref = merged_reference(pm)
    tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu", max_shard_size="20KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    got = load_state_dict(tmp_path / "out")
    for name, want in ref.items():
        assert got[name].dtype == torch.bfloat16
        # PEFT rounds the delta to bf16 before adding (two roundings), tunex rounds once.
        ulps = (got[name].view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert ulps.max() <= 2 and (ulps > 0).float().mean() < 0.2, name
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = merged(IDS).logits.float()
    # bf16 activations: agreement to bf16 precision, far tighter than the adapter's effect
    torch.testing.assert_close(logits, peft_logits, rtol=0.05, atol=0.05)


def test_is_clip_merges_the_vision_tower(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    cfg = transformers.CLIPConfig(
        text_config={**text, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config=vision,
        projection_dim=16,
    )
    transformers.CLIPModel(cfg).eval().save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "preprocessor_config.json").write_text(
        '{"crop_size": 32, "image_processor_type": "CLIPImageProcessor"}'
    )
    (tmp_path / "base" / "tokenizer.json").write_text("{}")  # the text tower's; must not be copied
    vision_model = transformers.CLIPVisionModel.from_pretrained(tmp_path / "base").eval()
    pm = peft.get_peft_model(vision_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = pm(pixel_values=pixels).last_hidden_state

    tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu", is_clip=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert all(k.startswith("vision_model.") for k in load_state_dict(tmp_path / "out"))
    merged = transformers.CLIPVisionModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).last_hidden_state, want, rtol=1e-4, atol=1e-4)
