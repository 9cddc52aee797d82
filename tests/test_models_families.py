"""The newer families (Qwen3, Qwen2.5, Llama 3.1 and YaRN RoPE scaling, ...) end to end against
transformers and PEFT (the oracles): `convert merge` against PEFT's merge_and_unload, an adapter
tunex exports loading in PEFT with tunex's logits, and greedy `tunex chat` against transformers'
`generate` with the model's own chat template. (Logits, packing, KV-cache decoding and training
gradients of every family are in test_models.py and test_models_train.py.)"""

from __future__ import annotations

import pytest
import torch
from _hf_families import hf_model
from _model_checks import greedy_chat_and_generate
from click.testing import CliRunner
from tunex.cli import cli
from tunex.models import load_model
from tunex.peft import apply_lora, export_adapter, trainable_state_dict

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ["llama3", "llama_yarn", "qwen2_5", "qwen3", "gemma2", "gemma3", "phi3", "phi3_longrope"]
IDS = torch.tensor([[1, 5, 9, 2, 33, 60, 7, 12, 40, 3, 77]])


def peft_model(hf, seed: int = 1):
    """PEFT LoRA on every linear with random non-zero A and B."""
    pm = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


@pytest.mark.parametrize("family", NEW)
def test_convert_merge_equals_peft_merge_and_unload(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "base")
    pm = peft_model(hf)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = pm.merge_and_unload()(IDS).logits
    result = CliRunner().invoke(
        cli,
        ["convert", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"), "-q"],
    )
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_model(tmp_path / "merged")(IDS), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", NEW)
def test_exported_adapter_loads_in_peft_with_tunex_logits(tmp_path, family):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    apply_lora(ours, "all-linear", 4, 8.0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = trainable_state_dict(ours)
    method = type("M", (), dict(target_modules="all-linear", alpha=8.0, dropout=0.0, r=4, use_dora=False))()
    method.use_rslora = False
    export_adapter(state, method, tmp_path / "adapter", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), loaded(IDS).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", NEW)
def test_greedy_chat_equals_transformers_generate(tmp_path, family):
    """SmolLM2's real tokenizer and chat template on a tiny random model of the family."""
    hf = hf_model(family, vocab_size=49152, bos_token_id=1, eos_token_id=2)
    n = 10
    result, new, expected = greedy_chat_and_generate(hf, tmp_path / "m", n)
    assert result.exit_code == 0, result.output
    assert len(new) == n or new[-1] == 2
    assert result.output == expected + "\n"


def test_gguf_export_of_what_gguf_cannot_say_is_refused_before_writing(tmp_path):
    from tunex.errors import FormatError
    from tunex.gguf_io import hf_to_gguf

    hf_model("gemma2").save_pretrained(tmp_path / "m")  # query_pre_attn_scalar 24, head dim 16
    with pytest.raises(FormatError, match="query_pre_attn_scalar 24 differs from head_dim 16 cannot be written"):
        hf_to_gguf(tmp_path / "m", tmp_path / "out.gguf")
    hf_model("phi3_longrope").save_pretrained(tmp_path / "p")
    with pytest.raises(FormatError, match="rope scaling 'longrope' cannot be written to GGUF"):
        hf_to_gguf(tmp_path / "p", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_gemma3_config_as_transformers_4_wrote_it_loads_the_same_model(tmp_path):
    """Hub checkpoints of Gemma 3 spell the local base, the global scaling and the layer pattern as
    transformers 4 did (rope_local_base_freq, rope_scaling, sliding_window_pattern)."""
    import json

    hf = hf_model("gemma3")
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    assert raw.pop("layer_types") == ["sliding_attention", "full_attention", "sliding_attention"]
    raw.update(
        rope_theta=params["full_attention"]["rope_theta"],
        rope_local_base_freq=params["sliding_attention"]["rope_theta"],
        rope_scaling={"rope_type": "linear", "factor": params["full_attention"]["factor"]},
        sliding_window_pattern=2,
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(IDS), hf(IDS).logits, atol=1e-4, rtol=1e-4)


def test_internlm2_lora_on_the_fused_wqkv_exports_merges_and_reloads_under_its_own_names(tmp_path):
    """InternLM2 keeps its fused wqkv (rows grouped per kv head), so LoRA adapts it whole, as PEFT on
    an InternLM2 model does, and the adapter carries InternLM2's names (wqkv, wo, w1, w2, w3). The
    oracle is the Llama the checkpoint was made from, with PEFT LoRAs on q, k and v that share the
    fused adapter's A and take their B rows from its B."""
    from _hf_families import fuse_grouped, make_internlm2
    from safetensors import safe_open
    from tunex.models.adapter import apply_adapter
    from tunex.models.config import to_checkpoint_names, tunex_targets

    _, hf = make_internlm2(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    cfg = ours.config
    names = apply_lora(ours, tunex_targets(["wqkv", "wo", "w1", "w2", "w3"], cfg), 4, 8.0)
    assert len(names) == 5 * cfg.num_layers and "model.layers.1.self_attn.qkv_proj" in names
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = trainable_state_dict(ours)
    method = type("M", (), dict(target_modules="all-linear", alpha=8.0, dropout=0.0, r=4, use_dora=False))()
    method.use_rslora = False
    export_adapter(to_checkpoint_names(state, cfg), method, tmp_path / "adapter", dtype=torch.float32)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.attention.wqkv.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.feed_forward.w2.lora_B.weight" in keys
    assert not any("self_attn" in k or "mlp." in k for k in keys)

    pm = peft_model(hf)  # LoRA on the Llama's every linear; its weights are set from tunex's below
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows = fuse_grouped(
        torch.arange(h * d), torch.arange(kv * d) + h * d, torch.arange(kv * d) + (h + kv) * d, h, kv, d
    )
    peft_params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, t in state.items():
            target = "base_model.model." + name
            if ".qkv_proj." not in name:
                peft_params[target].copy_(t)
                continue
            stacked = torch.empty_like(t) if "lora_B" in name else t
            if "lora_B" in name:
                stacked[rows] = t  # fused row i is stacked row rows[i]
            parts = (stacked[: h * d], stacked[h * d : (h + kv) * d], stacked[(h + kv) * d :])
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                peft_params[target.replace("qkv_proj", proj)].copy_(t if "lora_A" in name else part)
        expected_unmerged = pm(IDS).logits
        expected = pm.merge_and_unload()(IDS).logits

    reloaded = load_model(tmp_path / "base")
    assert len(apply_adapter(reloaded, tmp_path / "adapter")) == 5 * cfg.num_layers
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), expected_unmerged, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reloaded(IDS), expected_unmerged, atol=1e-4, rtol=1e-4)
    result = CliRunner().invoke(
        cli,
        ["convert", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"), "-q"],
    )
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert "model.layers.0.attention.wqkv.weight" in set(f.keys())
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(IDS), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3"])
def test_train_pth_to_hf_merge_chat_end_to_end(tmp_path, family):
    """`tunex train` (the real loop: packed data, LoRA on every linear, the soft-capped loss for
    Gemma 2), then `convert pth_to_hf`, whose adapter PEFT loads onto the transformers model with
    tunex's logits, then `convert merge` (transformers reads the merged folder with PEFT's merged
    logits) and `tunex chat` on it."""
    from test_train_helpers import make_data, make_tokenizer, write_config

    model = tmp_path / "m"
    vocab = make_tokenizer(model)
    hf_model(family, vocab_size=vocab, eos_token_id=2, bos_token_id=None, pad_token_id=0).save_pretrained(model)
    cfg = write_config(
        tmp_path / "c.toml", model, make_data(tmp_path / "d", "instruct"), "lora", "openai", tmp_path / "w"
    )
    cfg.write_text(cfg.read_text().replace("dropout = 0.05", "dropout = 0.0"))
    run = CliRunner().invoke(cli, ["train", str(cfg), "-o", "train.max_steps=4", "-o", "save.save_steps=4"])
    assert run.exit_code == 0, run.output
    pth = tmp_path / "w" / "iter_4.pth"
    result = CliRunner().invoke(cli, ["convert", "pth_to_hf", str(cfg), str(pth), str(tmp_path / "a"), "--fp32"])
    assert result.exit_code == 0, result.output

    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(7))
    ours = load_model(model)
    from tunex.config import load_config

    m = load_config(cfg).method
    apply_lora(ours, m.target_modules, m.r, m.alpha, m.dropout, m.use_rslora, m.use_dora)
    ours.load_state_dict(torch.load(pth, weights_only=True)["model"], strict=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
        theirs = pm(ids).logits
        torch.testing.assert_close(ours.eval()(ids), theirs, atol=1e-4, rtol=1e-4)
        assert (plain - theirs).abs().max() > 1e-3  # training moved the adapter
        merged_expected = pm.merge_and_unload()(ids).logits
    result = CliRunner().invoke(
        cli, ["convert", "merge", str(model), str(tmp_path / "a"), str(tmp_path / "merged"), "-q"]
    )
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, merged_expected, atol=1e-4, rtol=1e-4)
    chat = CliRunner().invoke(
        cli,
        ["chat", str(tmp_path / "merged"), "--prompt", "Who wrote Hamlet?", "--temperature", "0"]
        + ["--max-new-tokens", "4", "--no-streamer"],
    )
    assert chat.exit_code == 0 and chat.output.count("\n") == 1, chat.output
