"""LoRA layers and PEFT export against PEFT itself (a test oracle) on a tiny random transformers Llama."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from tunex.errors import ConfigError, FormatError
from tunex.peft import LoRALinear, apply_lora, export_adapter, select_targets, trainable_state_dict

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def method(**kw):
    base = dict(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear", use_rslora=False, use_dora=False)
    base.update(kw)
    return SimpleNamespace(**base)


def randomise_adapters(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for _, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_rslora": True},
        {"use_dora": True},
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*\.mlp\.(up|down)_proj"},
    ],
)
def test_exported_adapter_loads_in_peft_with_equal_logits(tmp_path, kw):
    m = method(**kw)
    model = tiny_llama()
    names = apply_lora(model, m.target_modules, m.r, m.alpha, m.dropout, m.use_rslora, m.use_dora)
    assert "lm_head" not in names
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    export_adapter(trainable_state_dict(model), m, tmp_path / "adapter", base_model="tiny", dtype=None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] == m.use_dora
    text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # and the adapter changed the model: the comparison is not between two base models
    with torch.no_grad():
        plain = tiny_llama()(input_ids=ids).logits
    assert (plain - ours).abs().max() > 1e-2


def test_exported_adapter_loads_in_transformers_with_format_metadata(tmp_path):
    """The Rust writer's adapter_model.safetensors: one file, {"format": "pt"}, no temporary left,
    and transformers' own load_adapter gives PEFT's logits."""
    from safetensors import safe_open

    m = method(target_modules=["q_proj", "v_proj"])
    model = tiny_llama()
    apply_lora(model, m.target_modules, m.r, m.alpha)
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    out = tmp_path / "adapter"
    export_adapter(trainable_state_dict(model), m, out, base_model="tiny", dtype=None)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    theirs_model = tiny_llama()
    theirs_model.load_adapter(str(out))
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_key_names_and_shapes(tmp_path):
    from safetensors.torch import load_file

    model = tiny_llama()
    apply_lora(model, ["q_proj"], 4, 8.0)
    export_adapter(trainable_state_dict(model), method(target_modules=["q_proj"]), tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and a.dtype == torch.float16
    assert len(tensors) == 4


def test_base_keys_stay_and_only_adapters_train():
    model = tiny_llama()
    before = set(model.state_dict())
    apply_lora(model, "all-linear", 4, 8.0)
    after = set(model.state_dict())
    assert before <= after
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # a base checkpoint loads into the adapted model by its own keys
    missing, unexpected = model.load_state_dict(tiny_llama(seed=3).state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)


def test_forward_matches_peft_in_training_mode_without_dropout():
    model = tiny_llama()
    apply_lora(model, "all-linear", 4, 8.0)
    randomise_adapters(model)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours = {k: v for k, v in trainable_state_dict(model).items()}
    theirs = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(ours[name.replace("base_model.model.", "").replace(".default", "")])
    model.train()
    ref.train()
    ids = torch.randint(0, 97, (2, 9))
    l1 = model(input_ids=ids, labels=ids).loss
    l2 = ref(input_ids=ids, labels=ids).loss
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for name, p in theirs.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name.replace("base_model.model.", "").replace(".default", "")].grad,
            p.grad,
            rtol=1e-4,
            atol=1e-5,
        )


def test_dropout_is_active_only_in_training():
    layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))


def test_bad_targets_name_what_exists():
    with pytest.raises(ConfigError, match="q_proj"):
        select_targets(tiny_llama(), ["query"])


def test_export_of_a_full_checkpoint_is_refused(tmp_path):
    with pytest.raises(FormatError, match="no LoRA tensors"):
        export_adapter({"model.embed_tokens.weight": torch.zeros(2, 2)}, method(), tmp_path / "x")
