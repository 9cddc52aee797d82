"""Checkpointing with CPU-offloaded layer inputs gives the gradients of an uncheckpointed run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tunex.kernels import lora_linear, rms_norm
from tunex.runtime.offload import offloaded_checkpoint


class Layer(nn.Module):
    """A residual block with a frozen base, a dropout LoRA adapter and a norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.base = torch.randn(dim, dim) * 0.2
        self.a = nn.Parameter(torch.randn(4, dim) * 0.2)
        self.b = nn.Parameter(torch.randn(dim, 4) * 0.2)

    def forward(self, x, scale):
        return x + lora_linear(rms_norm(x, self.norm), self.base, self.a, self.b, scale, dropout=0.3)


def run(layers, x, offload: bool, autocast: bool = False):
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = x
        for layer in layers:
            h = offloaded_checkpoint(layer, h, 0.5) if offload else layer(h, 0.5)
    h.float().pow(2).sum().backward()
    grads = [p.grad.clone() for layer in layers for p in (layer.a, layer.b)]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return h, grads


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_offloaded_checkpoint_matches_plain_backward(x_requires_grad, autocast):
    torch.manual_seed(0)
    layers = [Layer(12) for _ in range(3)]
    x = torch.randn(2, 5, 12)
    x_a, x_b = x.clone().requires_grad_(x_requires_grad), x.clone().requires_grad_(x_requires_grad)
    out, grads = run(layers, x_a, offload=False, autocast=autocast)
    out_o, grads_o = run(layers, x_b, offload=True, autocast=autocast)
    assert out_o.dtype == out.dtype
    torch.testing.assert_close(out_o, out)
    for g, go in zip(grads, grads_o):
        torch.testing.assert_close(go, g)
    if x_requires_grad:
        torch.testing.assert_close(x_b.grad, x_a.grad)


def test_without_grad_it_is_a_plain_call():
    layer = Layer(6)
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = offloaded_checkpoint(layer, x, 0.5)
    assert not out.requires_grad


def test_decoder_model_with_offloaded_checkpoints_matches_plain_checkpointing():
    from tunex.models.config import config_from_hf
    from tunex.models.decoder import CausalLM
    from tunex.peft import apply_lora

    cfg = config_from_hf(
        {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 50,
        }
    )
    torch.manual_seed(0)
    model = CausalLM(cfg)
    apply_lora(model, "all-linear", 4, 8, 0.2)
    nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight)  # B starts at zero
    model.train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for offload in (False, True):
        model.model.offload_checkpoints = offload
        torch.manual_seed(1)
        model(ids).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
