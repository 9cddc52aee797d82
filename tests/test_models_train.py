"""The training path of every family against transformers + PEFT (the oracles), in grad mode.

Each tiny random model gets LoRA on every linear layer in tunex and in PEFT with the same non-zero
initial adapter weights; the loss of tunex's training step (tunex.dist.wrap.LossModule: the
decoder in training mode, the runtime's arena and lean rebuilds, the chunked cross-entropy head)
and the gradient of every LoRA parameter must equal PEFT's. Packed rows (position ids restarting
per document) are compared with transformers run on each document alone. The native CPU kernels
are on, and the test checks they ran.
"""

from __future__ import annotations

import pytest
import torch
from _hf_families import BASE, FAMILIES, fuse_grouped, hf_model, make_internlm2
from _model_checks import documents_loss, packed_documents, spy_kernel_choices
from conftest import require_native
from tunex.dist.wrap import LossModule
from tunex.kernels import attention, registry
from tunex.models import load_model
from tunex.models.config import GEMMA
from tunex.peft import apply_lora

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE = (
    "rms_norm_forward_f32",
    "rope_f32",
    "attention_forward_f32",
    "swiglu_forward_f32",
    "lora_down_f32",
    "cross_entropy_f32",
)
R, ALPHA = 4, 8


def _pair(tmp_path, family: str):
    """(tunex model, transformers model) with the same weights."""
    if family == "internlm2":  # no transformers class: the oracle is the Llama it was made from
        _, hf = make_internlm2(tmp_path / family)
        return load_model(tmp_path / family), hf
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / family)
    return load_model(tmp_path / family), hf


class _Same:
    """A tunex adapter parameter whose PEFT counterpart is one parameter."""

    def __init__(self, p):
        self.p = p

    def value(self):
        return self.p

    def grad(self):
        return self.p.grad


class _FusedQKV:
    """InternLM2's LoRA on the fused wqkv (grouped rows) against PEFT's LoRAs on the Llama's q, k
    and v: one A shared by the three (their A gradients add up) and B = their B rows in wqkv's order."""

    def __init__(self, parts, cfg, kind: str):
        self.parts, self.kind = parts, kind
        self.shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def _join(self, tensors):
        return sum(tensors) if self.kind == "lora_A" else fuse_grouped(*tensors, *self.shape)

    def value(self):
        return self._join([p for p in self.parts]) / (3 if self.kind == "lora_A" else 1)

    def grad(self):
        return self._join([p.grad for p in self.parts])


def adapted_pair(tmp_path, family: str):
    """tunex and PEFT models with LoRA on every linear (not the head), both holding PEFT's random
    non-zero initial A and B, in training mode; and a map tunex name -> its PEFT counterpart."""
    ours, hf = _pair(tmp_path, family)
    ref = peft.get_peft_model(
        hf,
        peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False),
    )
    apply_lora(ours, "all-linear", R, ALPHA)
    peft_params = {
        n.removeprefix("base_model.model.").replace(".default", ""): p
        for n, p in ref.named_parameters()
        if p.requires_grad
    }
    theirs = {n: _Same(p) for n, p in peft_params.items()}
    if ours.config.qkv_grouped:
        for name in [n for n in peft_params if ".self_attn.q_proj." in n]:
            parts = [peft_params[name.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            kind = "lora_A" if ".lora_A." in name else "lora_B"
            if kind == "lora_A":  # one A for the three
                with torch.no_grad():
                    parts[1].copy_(parts[0])
                    parts[2].copy_(parts[0])
            theirs[name.replace("q_proj", "qkv_proj")] = _FusedQKV(parts, ours.config, kind)
            for x in ("q_proj", "k_proj", "v_proj"):
                del theirs[name.replace("q_proj", x)]
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    c = ours.config
    per_layer = (1 if c.fused_qkv else 3) + 1 + (1 if c.fused_gate_up else 2) + 1  # adapted linears
    assert set(mine) == set(theirs) and len(mine) == 2 * per_layer * c.num_layers
    with torch.no_grad():
        for name, p in mine.items():
            value = theirs[name].value()
            assert bool(value.abs().sum() > 0)
            p.copy_(value)
    return ours.train(), ref.train(), mine, theirs


def _check_grads(mine, theirs):
    for name, p in mine.items():
        assert p.grad is not None, name
        expected = theirs[name].grad()
        scale = float(expected.abs().max())
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


FAMILY_IDS = [*FAMILIES, "internlm2"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["lean", "checkpointing"])
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_lora_loss_and_grads_match_peft(tmp_path, monkeypatch, family, checkpointing):
    require_native(*NATIVE)
    ours, ref, mine, theirs = adapted_pair(tmp_path, family)
    ours.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that is not trained on
    chosen = spy_kernel_choices(monkeypatch)
    dense = _count_dense_masks(monkeypatch)
    loss = LossModule(ours)(ids, labels, None)
    loss.backward()
    expected = ref(input_ids=ids, labels=labels).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    _check_grads(mine, theirs)
    expected_impls = {
        "rmsnorm": "native",
        "rope": "native",
        "attention": "native",
        "swiglu": "native",
        "lora_linear": "fused-native",
        "cross_entropy": "native",
    }
    if ours.config.family in GEMMA:  # a GELU gate, not SwiGLU
        del expected_impls["swiglu"]
    if ours.logit_softcap:  # soft-capped logits: whole, then torch's cross-entropy
        del expected_impls["cross_entropy"]
    for op, impl in expected_impls.items():
        assert impl in chosen.get(op, set()), (op, chosen.get(op))
    assert dense == []  # sliding windows as the rows' spans, soft-capped logits in the kernel: no (T, T) mask


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_packed_lora_loss_and_grads_match_documents_one_by_one(tmp_path, monkeypatch, family):
    """Two packed rows (tunex's packing: position ids restart per document) against transformers +
    PEFT on each document alone, the losses summed over the same target tokens."""
    require_native(*NATIVE)
    ours, ref, mine, theirs = adapted_pair(tmp_path, family)
    ids, labels, pos, docs = packed_documents(BASE["vocab_size"])
    chosen = spy_kernel_choices(monkeypatch)
    dense = _count_dense_masks(monkeypatch)
    loss = LossModule(ours)(ids, labels, pos)
    loss.backward()
    expected = documents_loss(ref, docs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    _check_grads(mine, theirs)
    assert "native" in chosen["rmsnorm"] and "fused-native" in chosen["lora_linear"]
    # sliding windows (shorter than some documents) and soft-capped logits too: the spans only
    assert chosen["attention"] == {"native"} and dense == []


@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_gemma2_on_cudas_flex_softcap_path_matches_peft(tmp_path, monkeypatch, flex_backward_on_cpu, packed):
    """Gemma 2's training step with its attention on the path CUDA takes: the registry answers
    attention as for the same facts on CUDA (its conditions are pure), so every layer, global and
    sliding, packed or not, runs flex_softcapped (FlexAttention eagerly on the CPU, with its eager
    backward). Loss and LoRA gradients against transformers + PEFT (packed: on each document alone);
    neither a dense mask nor the torch soft-cap ops are made."""
    ours, ref, mine, theirs = adapted_pair(tmp_path, "gemma2")
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    real = registry.choose

    def as_on_cuda(op, facts):
        if op == "attention":
            facts = registry.Facts("cuda", facts.dtype, **{k: getattr(facts, k) for k in facts.__slots__[2:]})
        return real(op, facts)

    monkeypatch.setattr(registry, "choose", as_on_cuda)
    chosen = spy_kernel_choices(monkeypatch)
    dense = _count_dense_masks(monkeypatch)
    monkeypatch.setattr(attention, "softcapped", lambda *a: pytest.fail("the dense soft-cap path ran"))
    if packed:
        ids, labels, pos, docs = packed_documents(BASE["vocab_size"])
        loss = LossModule(ours)(ids, labels, pos)
        expected = documents_loss(ref, docs)
    else:
        ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
        labels = ids.clone()
        labels[:, :5] = -100
        loss = LossModule(ours)(ids, labels, None)
        expected = ref(input_ids=ids, labels=labels).loss
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    _check_grads(mine, theirs)
    assert chosen["attention"] == {"flex-softcap"} and dense == []


def _count_dense_masks(monkeypatch) -> list:
    """The masks the model builds from now on in this test: Documents.dense and the banded
    attention_mask (one entry per call)."""
    from tunex.kernels.attention import Documents
    from tunex.models import decoder, gemma

    calls = []
    real_dense, real_mask = Documents.dense, decoder.attention_mask

    def dense(self):
        calls.append("dense")
        return real_dense(self)

    def mask(*args, **kwargs):
        made = real_mask(*args, **kwargs)
        if made is not None:
            calls.append("attention_mask")
        return made

    monkeypatch.setattr(Documents, "dense", dense)
    for module in (decoder, gemma):
        monkeypatch.setattr(module, "attention_mask", mask)
    return calls
