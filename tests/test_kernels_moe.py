"""The grouped MoE experts node (tunex.kernels.moe) in tunex's sparse block against transformers'
``MixtralSparseMoeBlock`` with the same weights (the oracle): the output, the input's gradient
(through the experts and through the router's weights) and, with LoRA on every expert linear, each
adapter's gradient, where transformers' block runs on the adapted weights ``W + s B A`` built
from the same adapter tensors with autograd. The routing is steered so that one expert gets no
rows, one gets most of them, and some rows tie between two experts.

Dropout and 4-bit bases against the model's own expert loop with the same seed (the loop draws
the same masks in the same order), and the registry's choice of the grouped node in training.
"""

from __future__ import annotations

import pytest
import torch
from tunex.kernels import moe as moe_kernel
from tunex.kernels import registry
from tunex.models.config import config_from_hf
from tunex.models.moe import RouterStats, SparseMoE
from tunex.peft.lora import LoRALinear
from tunex.runtime.compose import Plain, Standard

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

E, H, INTER, ROWS = 8, 64, 96, 48
R, ALPHA = 4, 8


def hf_config():
    return transformers.MixtralConfig(
        vocab_size=32,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=2,
    )


def blocks():
    """transformers' block (random weights) and tunex's with the same weights; the router reads
    the logits off the first E features of a row (gate weight [I | 0])."""
    torch.manual_seed(0)
    cfg = hf_config()
    theirs = transformers.MixtralForCausalLM(cfg).model.layers[0].mlp
    ours = SparseMoE(config_from_hf({**cfg.to_dict(), "model_type": "mixtral"}), RouterStats())
    with torch.no_grad():
        theirs.experts.gate_up_proj.normal_(0, 0.1)
        theirs.experts.down_proj.normal_(0, 0.1)
        theirs.gate.weight.zero_()
        theirs.gate.weight[:, :E] = torch.eye(E)
        ours.gate.weight.copy_(theirs.gate.weight)
        for e, expert in enumerate(ours.experts):
            expert.w1.weight.copy_(theirs.experts.gate_up_proj[e, :INTER])
            expert.w3.weight.copy_(theirs.experts.gate_up_proj[e, INTER:])
            expert.w2.weight.copy_(theirs.experts.down_proj[e])
    theirs.requires_grad_(False)
    ours.requires_grad_(False)
    return theirs, ours


def steered_rows() -> torch.Tensor:
    """Rows whose routing (top-2 of their first E features) leaves expert 7 without rows, sends
    most rows to expert 0, and ties experts 2 and 3 exactly in some rows."""
    torch.manual_seed(1)
    x = torch.randn(ROWS, H)
    logits = torch.randn(ROWS, E)
    logits[:, 7] = -30.0  # never chosen
    logits[: ROWS * 3 // 4, 0] = 8.0  # expert 0 takes most of the first three quarters of the rows
    logits[::5, 2] = logits[::5, 3] = 9.0  # a tie for the top slot
    x[:, :E] = logits
    return x


def routed(ours: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ours.route(x, record=False)[1]


def adapt(ours: SparseMoE) -> list[LoRALinear]:
    """LoRA on every expert linear, B random (not zero) so that A gets a gradient too."""
    torch.manual_seed(2)
    layers = []
    for expert in ours.experts:
        for name in ("w1", "w3", "w2"):
            lora = LoRALinear(getattr(expert, name), R, ALPHA)
            with torch.no_grad():
                lora.lora_B.weight.normal_(0, 0.1)
            setattr(expert, name, lora)
            layers.append(lora)
    return layers


def hf_with_adapters(theirs, ours: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """transformers' block on the weights W + s B A (stacked as it stores them), with autograd to A and B."""
    gate_up, down = [], []
    for expert in ours.experts:
        w1, w3, w2 = (
            lora.weight + lora.scaling * lora.lora_B.weight @ lora.lora_A.weight for lora in expert.projections()
        )
        gate_up.append(torch.cat([w1, w3]))
        down.append(w2)
    params = {"experts.gate_up_proj": torch.stack(gate_up), "experts.down_proj": torch.stack(down)}
    return torch.func.functional_call(theirs, params, (x.unsqueeze(0),)).squeeze(0)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding of differently ordered sums: 1e-4 of the largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def close_grad(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The input's gradient: equal up to float32 rounding, 1e-6 of its largest entry. transformers'
    own float32 gradient is 1.6e-5 off its float64 one here (entries up to ~41), tunex's 2.5e-5 (it
    takes the routing weights' gradient as <d act, act>, not <dout, expert output>)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def run(fn, x: torch.Tensor, probe: torch.Tensor, params=()):
    """(output, grad of x, grads of params) for the loss sum(fn(x) * probe)."""
    xi = x.clone().requires_grad_(True)
    out = fn(xi)
    grads = torch.autograd.grad((out * probe).sum(), [xi, *params], allow_unused=True)
    return out.detach(), grads[0], grads[1:]


def test_the_steered_routing_has_an_empty_expert_a_crowded_one_and_ties():
    _, ours = blocks()
    x = steered_rows()
    chosen = routed(ours, x)
    counts = torch.bincount(chosen.reshape(-1), minlength=E)
    assert counts[7] == 0 and counts[0] >= ROWS // 2 and counts.max() > 4 * counts[counts > 0].min()
    assert (chosen[::5].sort(dim=1).values == torch.tensor([2, 3])).all()


def test_frozen_block_forward_and_input_grad_match_transformers():
    theirs, ours = blocks()
    x, probe = steered_rows(), torch.randn(ROWS, H)
    out, dx, _ = run(lambda t: ours(t, rt=Standard()), x, probe)
    ref, ref_dx, _ = run(lambda t: theirs(t.unsqueeze(0)).squeeze(0), x, probe)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    close_grad(dx, ref_dx)
    assert dx[:, :E].abs().sum() > 0  # the router's share of the input gradient is in it


def test_lora_block_grads_match_transformers_on_the_adapted_weights():
    theirs, ours = blocks()
    layers = adapt(ours)
    params = [t for lora in layers for t in (lora.lora_A.weight, lora.lora_B.weight)]
    x, probe = steered_rows(), torch.randn(ROWS, H)
    out, dx, grads = run(lambda t: ours(t, rt=Standard()), x, probe, params)
    ref, ref_dx, ref_grads = run(lambda t: hf_with_adapters(theirs, ours, t), x, probe, params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    close_grad(dx, ref_dx)
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        expert = i // 6
        if expert == 7:  # no rows: no gradient, as when the loop does not call the expert
            assert g is None and not ref_g.abs().any()
        else:
            close(g, ref_g)


def test_training_chooses_the_grouped_node_and_inference_the_loop(monkeypatch):
    _, ours = blocks()
    adapt(ours)
    calls = []
    real = moe_kernel.grouped_swiglu_experts
    monkeypatch.setattr(moe_kernel, "grouped_swiglu_experts", lambda *a: (calls.append(1), real(*a))[1])
    x = steered_rows()
    ours(x, rt=Standard())
    assert calls == [1]
    with torch.no_grad():
        ours(x, rt=Standard())
    assert calls == [1]
    assert registry.choose("moe_experts", registry.Facts("cpu", torch.float32, grad=True)) == "grouped"


@pytest.mark.parametrize("kind", ["dropout", "qlora"])
def test_dropout_and_4bit_experts_match_the_expert_loop(kind):
    from tunex.quant.linear import NF4Linear

    _, ours = blocks()
    if kind == "qlora":
        for expert in ours.experts:
            for name in ("w1", "w3", "w2"):
                setattr(expert, name, NF4Linear.from_linear(getattr(expert, name)))
    layers = adapt(ours)
    if kind == "dropout":
        for lora in layers:
            lora.lora_dropout = torch.nn.Dropout(0.25)
    ours.train()
    params = [t for lora in layers for t in (lora.lora_A.weight, lora.lora_B.weight)]
    x, probe = steered_rows(), torch.randn(ROWS, H)
    results = []
    for rt in (Standard(), Plain()):
        torch.manual_seed(3)  # the same dropout seeds, drawn in the same order
        results.append(run(lambda t, rt=rt: ours(t, rt=rt), x, probe, params))
    (out, dx, grads), (ref, ref_dx, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    close_grad(dx, ref_dx)
    for g, ref_g in zip(grads, ref_grads):
        if ref_g is None:
            assert g is None
        else:
            close(g, ref_g)


def test_layers_it_cannot_run_keep_the_loop():
    _, ours = blocks()
    assert moe_kernel.expert_projections(ours.experts) is not None
    ours.experts[3].w2.weight.requires_grad_(True)  # full fine-tuning of one expert: a weight gradient
    assert moe_kernel.expert_projections(ours.experts) is None
    ours.experts[3].w2.weight.requires_grad_(False)
    lora = LoRALinear(ours.experts[1].w1, R, ALPHA, use_dora=True)
    ours.experts[1].w1 = lora
    assert moe_kernel.expert_projections(ours.experts) is None


def test_rejects_mismatched_shapes():
    proj = moe_kernel.Projection(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        moe_kernel.grouped_swiglu_experts(
            torch.zeros(5, 3), torch.zeros(5, 2), torch.zeros(4, 2, dtype=torch.long), [(proj,) * 3]
        )


BIG = dict(grad=False, macs=1 << 24, shape_ok=True)


@pytest.fixture
def onednn_calls(monkeypatch):
    """The input shapes of every oneDNN product made during the test (small ones qualifying too)."""
    from tunex.kernels import _dispatch

    if registry.choose("matmul_f32", registry.Facts("cpu", torch.float32, **BIG)) != "onednn":
        pytest.skip("torch without oneDNN here, or TUNEX_ONEDNN=0")
    calls = []
    real = _dispatch._ONEDNN_LINEAR

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape)
            return real(*a)

        def binary(self, *a):  # the product with an addend (matmul_nt's ``add``)
            calls.append(a[0].shape)
            return real.binary(*a)

    monkeypatch.setattr(_dispatch, "_ONEDNN_LINEAR", Spy())
    monkeypatch.setattr(registry, "ONEDNN_MIN_MACS", 1)  # the test's small products would qualify too
    return calls


def test_expert_products_stay_off_onednn(onednn_calls):
    """An expert's rows change from step to step; oneDNN builds and caches a kernel per product shape
    (measured on the bench's Mixtral shape: each step slower and the process growing by hundreds of
    MB), so the node's products run torch's matmul while a fixed-shape product of the same size
    still takes oneDNN."""
    from tunex.kernels import _dispatch

    calls = onednn_calls
    assert registry.choose("matmul_f32", registry.Facts("cpu", torch.float32, shape_varies=True, **BIG)) == "torch.mm"
    _, ours = blocks()
    adapt(ours)
    x = steered_rows().requires_grad_()
    ours(x, rt=Standard()).sum().backward()
    assert calls == []
    with torch.no_grad():  # the same call, of a shape that recurs, does (as inside autograd Functions)
        _dispatch.matmul_nt(torch.randn(64, H), torch.randn(32, H))
    assert len(calls) == 1


@pytest.mark.parametrize("lora", [False, True])
def test_expert_products_stay_off_onednn_without_grad(onednn_calls, lora):
    """Chat, serve and evaluation run the experts through the model's loop, not the autograd node;
    its per-expert products change shape from call to call just the same, so they too take torch's
    matmul, while the same layer's product outside the loop still takes oneDNN."""
    calls = onednn_calls
    _, ours = blocks()
    if lora:
        adapt(ours)
    ours.eval()
    rt = Standard()
    with torch.no_grad():
        ours(steered_rows(), rt=rt)
        assert calls == []
        rt.project((ours.experts[0].w1,), torch.randn(64, H))  # outside the experts' loop
    assert len(calls) == 1


def test_the_node_asks_its_product_questions_once_per_call(monkeypatch):
    """The node's products differ in their sizes only: it asks the registry's matmul_f32 and
    lora_linear rows once per call (sizes unknown), not once per product of each expert."""
    asked = []
    real = registry.choose
    monkeypatch.setattr(registry, "choose", lambda op, facts: (asked.append(op), real(op, facts))[1])
    _, ours = blocks()
    adapt(ours)
    x = steered_rows().requires_grad_()
    ours(x, rt=Standard()).sum().backward()
    assert asked.count("matmul_f32") == 1
    assert asked.count("lora_linear") == 1


def test_the_node_follows_a_matmul_row_that_takes_onednn_for_its_products(onednn_calls, monkeypatch):
    """Where the matmul_f32 row chose oneDNN for products whose shape varies, the node's products
    would take it through the dispatcher (not torch.mm directly), with the same results."""
    theirs, ours = blocks()
    layers = adapt(ours)
    params = [t for lora in layers for t in (lora.lora_A.weight, lora.lora_B.weight)]
    x, probe = steered_rows(), torch.randn(ROWS, H)
    out, dx, grads = run(lambda t: ours(t, rt=Standard()), x, probe, params)
    assert onednn_calls == []
    every = registry.Impl("onednn", "test: every float32 CPU product outside autograd", lambda f: f.grad is False)
    monkeypatch.setitem(registry.OPS, "matmul_f32", (every, *registry.OPS["matmul_f32"][1:]))
    out2, dx2, grads2 = run(lambda t: ours(t, rt=Standard()), x, probe, params)
    assert len(onednn_calls) > 0
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx2, dx, rtol=1e-5, atol=1e-5)
    for g, g2 in zip(grads, grads2):
        assert (g is None) == (g2 is None)
        if g is not None:
            close(g2, g)
