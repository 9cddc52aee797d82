"""The LLaVA model (tower + projector + decoder) against transformers' LlavaForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch
from tunex.dist.wrap import LossModule
from tunex.models.llava import load_llava
from tunex.peft import apply_lora

pytest.importorskip("transformers")

VOCAB, IMAGE_ID, PATCHES = 128, 127, 16
TOWER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,  # head dim 16
    num_key_value_heads=2,
    vocab_size=VOCAB,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


def hf_llava(folder=None, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**TOWER),
        text_config=LlamaConfig(**TEXT),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if folder is not None:
        model.save_pretrained(folder)
    return model


def prompt(n_images: int, text: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n_images):
        parts += [torch.randint(0, IMAGE_ID, (text,), generator=g), torch.full((PATCHES,), IMAGE_ID)]
    parts.append(torch.randint(0, IMAGE_ID, (text,), generator=g))
    return torch.cat(parts)


def test_logits_match_transformers(tmp_path):
    hf = hf_llava(tmp_path)
    ours = load_llava(tmp_path)
    ids = torch.stack((prompt(2), prompt(2, seed=1)))  # (2, T): two images per row
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # text only: the decoder alone
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :5]), hf(input_ids=ids[:, :5]).logits, rtol=1e-4, atol=1e-4)


def test_image_count_must_match_placeholders(tmp_path):
    hf = hf_llava(tmp_path)
    ours = load_llava(tmp_path)
    with pytest.raises(ValueError, match="32 image-token positions; 1 image"):
        ours(prompt(2)[None], pixel_values=torch.randn(1, 3, 32, 32))
    # without images (a decoding step that produced the image token) it is a token, as in transformers
    ids = torch.tensor([[5, IMAGE_ID, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_packed_rows_keep_samples_apart(tmp_path):
    hf_llava(tmp_path)
    ours = load_llava(tmp_path)
    a, b = prompt(1), prompt(2, seed=3)
    pa, pb = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    ids = torch.cat((a, b))[None]
    pos = torch.cat((torch.arange(len(a)), torch.arange(len(b))))[None]
    with torch.no_grad():
        packed = ours(ids, pos, pixel_values=torch.cat((pa, pb)))
        alone_a = ours(a[None], pixel_values=pa)
        alone_b = ours(b[None], pixel_values=pb)
    torch.testing.assert_close(packed, torch.cat((alone_a, alone_b), dim=1), rtol=1e-4, atol=1e-4)


def test_training_loss_and_lora_gradients_match_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = hf_llava(tmp_path)
    ours = load_llava(tmp_path)
    targets = ["q_proj", "v_proj", "gate_proj"]
    peft_model = get_peft_model(
        hf,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj)",
            init_lora_weights=False,  # random B too: the adapters change the output
        ),
    )
    for p in hf.model.multi_modal_projector.parameters():  # the projector trains too
        p.requires_grad_(True)
    apply_lora(ours.language_model, targets, r=4, alpha=8)
    ours.multi_modal_projector.requires_grad_(True)
    hf_lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    ours_lora = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert len(hf_lora) == len(ours_lora) == 2 * 3 * TEXT["num_hidden_layers"]

    def hf_name(name: str) -> str:  # language_model.model.layers.0.self_attn.q_proj.lora_A.weight
        layer = name.removeprefix("language_model.model.")
        return next(n for n in hf_lora if n.endswith(layer.replace(".weight", ".default.weight")))

    with torch.no_grad():
        for name, p in ours_lora.items():
            p.copy_(hf_lora[hf_name(name)])

    ids = torch.stack((prompt(1), prompt(1, seed=2)))
    labels = ids.clone()
    labels[ids == IMAGE_ID] = -100
    labels[:, :3] = -100
    pixels = torch.randn(2, 3, 32, 32)
    peft_model.train()
    ours.train()
    want = peft_model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    want.backward()
    got = LossModule(ours)(ids, labels, None, pixel_values=pixels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, p in ours_lora.items():
        torch.testing.assert_close(p.grad, hf_lora[hf_name(name)].grad, rtol=1e-4, atol=1e-5)
    for name, p in ours.multi_modal_projector.named_parameters():
        ref = dict(hf.model.multi_modal_projector.named_parameters())[name]
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in ours.vision_tower.parameters())


def test_siglip_tower_with_full_features_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(**TOWER),
        text_config=LlamaConfig(**TEXT),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",  # SigLIP has no class token: every patch
    )
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_llava(tmp_path)
    assert ours.image_tokens == PATCHES
    ids, pixels = prompt(1)[None], torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, pixel_values=pixels), hf(input_ids=ids, pixel_values=pixels).logits, rtol=1e-4, atol=1e-4
        )
    # written back under transformers' names (what convert pth_to_hf writes), transformers reads the same model
    import json

    from safetensors.torch import save_file
    from tunex.models.llava import hf_config, hf_state

    out = tmp_path / "again"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in hf_state(ours).items()}, str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(ours, hf.config.text_config.to_dict())))
    again = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels), rtol=1e-4, atol=1e-4
        )
