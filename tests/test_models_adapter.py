"""A PEFT adapter applied unmerged to a tunex model gives PEFT's own logits (PEFT is the oracle)."""

from __future__ import annotations

import pytest
import torch
from tunex.errors import FormatError
from tunex.models import load_model
from tunex.models.adapter import apply_adapter
from tunex.peft import LoRALinear


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_rslora": True, "alpha_pattern": {"v_proj": 4}}, {"use_dora": True}],
    ids=["lora", "rslora+pattern", "dora"],
)
def test_adapter_logits_match_peft(tmp_path, extra):
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **extra
    )
    model = peft.get_peft_model(base, lora).eval()
    model.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "base")
    names = apply_adapter(ours, tmp_path / "adapter")
    assert len(names) == 6 and isinstance(ours.model.layers[1].mlp.down_proj, LoRALinear)
    ids = torch.randint(0, 80, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-4, rtol=1e-4)


def test_adapter_for_another_model_is_refused(tmp_path):
    import json

    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file(
        {
            "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
            "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
        },
        tmp_path / "a" / "adapter_model.safetensors",
    )
    with pytest.raises(FormatError, match="layers.5.self_attn.q_proj.*do not fit this model"):
        apply_adapter(load_model(tmp_path / "base"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="PEFT adapter folder"):
        apply_adapter(load_model(tmp_path / "base"), tmp_path / "base")
