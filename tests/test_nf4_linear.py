"""NF4Linear, the QLoRA base layer: forward/backward against a dense reference, LoRA on top, and
state dicts exchanged with bitsandbytes' Linear4bit in both directions."""

from __future__ import annotations

import io

import pytest
import torch
import tunex.quant as tq
from _bnb_oracle import _eager_bitsandbytes, bits  # noqa: F401
from torch import nn
from tunex.peft.lora import LoRALinear

bnb = pytest.importorskip("bitsandbytes")


def make_linear(in_features=128, out_features=48, bias=True, seed=0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def dense_reference(layer: tq.NF4Linear) -> nn.Linear:
    ref = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize(torch.float32))
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    ref.requires_grad_(False)
    return ref


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_x_times_dequantized_weight(quant_type, double_quant):
    layer = tq.NF4Linear.from_linear(make_linear(), quant_type, 64, double_quant)
    x = torch.randn(2, 5, 128)
    w = tq.dequantize(layer.qweight, torch.float32)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, layer.bias))


def test_gradients_reach_the_input_never_the_weight():
    layer = tq.NF4Linear.from_linear(make_linear())
    ref = dense_reference(layer)
    x = torch.randn(3, 7, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert not layer.weight.requires_grad and layer.weight.grad is None
    assert all(not p.requires_grad for p in layer.parameters())
    # an unfrozen bias does get its gradient
    layer.bias.requires_grad_(True)
    ref.bias.requires_grad_(True)
    x = torch.randn(4, 128)
    layer(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


def test_lora_on_top_matches_a_dense_base():
    layer = tq.NF4Linear.from_linear(make_linear(bias=False))
    dense = dense_reference(layer)
    torch.manual_seed(1)
    qlora = LoRALinear(layer, r=8, alpha=16)
    torch.manual_seed(1)
    lora = LoRALinear(dense, r=8, alpha=16)
    with torch.no_grad():
        qlora.lora_B.weight.normal_()
        lora.lora_B.weight.copy_(qlora.lora_B.weight)
        lora.lora_A.weight.copy_(qlora.lora_A.weight)
    x = torch.randn(2, 6, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = qlora(x), lora(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(qlora.lora_A.weight.grad, lora.lora_A.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qlora.lora_B.weight.grad, lora.lora_B.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def bnb_layer(in_features, out_features, bias, quant_type, double_quant):
    return bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=torch.float32,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )


@pytest.mark.parametrize(
    "quant_type,double_quant,dtype",
    [("nf4", True, torch.float32), ("fp4", False, torch.float32), ("nf4", True, torch.bfloat16)],
)
def test_state_dict_is_bitsandbytes_layout(quant_type, double_quant, dtype):
    linear = make_linear(dtype=dtype)
    theirs = bnb_layer(128, 48, True, quant_type, double_quant).to(dtype)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes when the layer is moved to a device
    ours = tq.NF4Linear.from_linear(linear, quant_type, 64, double_quant)
    sd_theirs, sd_ours = theirs.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_theirs:
        assert sd_ours[key].dtype == sd_theirs[key].dtype and sd_ours[key].shape == sd_theirs[key].shape, key
        assert torch.equal(bits(sd_ours[key]), bits(sd_theirs[key])), key


def load_into_bnb(state_dict, in_features, out_features, quant_type, double_quant):
    layer = bnb_layer(in_features, out_features, "bias" in state_dict, quant_type, double_quant)
    stats = {k: v for k, v in state_dict.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(state_dict["weight"], stats, device="cpu", module=layer)
    if "bias" in state_dict:
        layer.bias = nn.Parameter(state_dict["bias"].clone(), requires_grad=False)
    return layer.train()  # train mode keeps bitsandbytes' CPU forward on dequantize + fp32 matmul


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_bitsandbytes_loads_tunex_and_tunex_loads_bitsandbytes(quant_type, double_quant):
    ours = tq.NF4Linear.from_linear(make_linear(256, 64, seed=3), quant_type, 64, double_quant)
    theirs = load_into_bnb(ours.state_dict(), 256, 64, quant_type, double_quant)
    x = torch.randn(5, 256)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-6, atol=1e-6)

    native = bnb_layer(256, 64, True, quant_type, double_quant)
    native.load_state_dict(make_linear(256, 64, seed=4).state_dict())
    native = native.to("cpu").train()
    loaded = tq.NF4Linear.from_linear(make_linear(256, 64, seed=5), quant_type, 64, double_quant)
    loaded.load_state_dict(native.state_dict())
    torch.testing.assert_close(loaded(x), native(x), rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_and_dtype_casts():
    layer = tq.NF4Linear.from_linear(make_linear(dtype=torch.bfloat16), compute_dtype=torch.float32)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = tq.NF4Linear.from_linear(make_linear(seed=9, dtype=torch.bfloat16))
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 128)
    assert torch.equal(other(x), layer(x))
    assert other.weight_dtype == torch.bfloat16 and other.nested_offset == layer.nested_offset
    before = layer(x)
    layer.to(torch.float16)  # must not cast the packed state or the float32 absmax
    assert layer.nested_absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    torch.testing.assert_close(layer(x), before, rtol=1e-2, atol=1e-2)


def test_from_state_dict_rebuilds_the_layer():
    layer = tq.NF4Linear.from_linear(make_linear(), "fp4", 128, True)
    sd = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in layer.state_dict().items()}
    rebuilt = tq.NF4Linear.from_state_dict(sd, "model.layers.0.mlp.up_proj.")
    x = torch.randn(3, 128)
    assert torch.equal(rebuilt(x), layer(x)) and rebuilt.blocksize == 128 and rebuilt.quant_type == "fp4"
    del sd["model.layers.0.mlp.up_proj.weight.nested_absmax"]
    with pytest.raises(
        ValueError, match=r"ckpt\.safetensors: model\.layers\.0\.mlp\.up_proj\.weight\.nested_absmax: missing"
    ):
        tq.NF4Linear.from_state_dict(sd, "model.layers.0.mlp.up_proj.", source="ckpt.safetensors")


def test_load_errors_name_the_key():
    layer = tq.NF4Linear.from_linear(make_linear())
    wrong = tq.NF4Linear.from_linear(make_linear(64, 48)).state_dict()
    with pytest.raises(RuntimeError, match=r"weight: shape \(48, 64\)"):
        layer.load_state_dict(wrong)
    sd = layer.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match=r"weight\.absmax: has 95 elements, expected 96"):
        layer.load_state_dict(sd)
    dense = make_linear().state_dict()
    with pytest.raises(RuntimeError, match="quant_state"):
        layer.load_state_dict(dense)


def test_memory_and_compute_dtype():
    layer = tq.NF4Linear.from_linear(make_linear(1024, 512, bias=False))
    assert layer.qweight.nbytes / (1024 * 512) < 0.52
    assert layer.resolved_compute_dtype() == torch.float32
    bf = tq.NF4Linear.from_linear(make_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 128)
    y = bf(x)
    assert y.dtype == torch.float32
    w = tq.dequantize(bf.qweight, torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(x.bfloat16(), w, bf.bias.bfloat16()).float())


@pytest.mark.parametrize("double_quant", [True, False])
def test_shard_by_blocks_lays_out_one_block_per_row_and_changes_no_value(double_quant):
    """train.fsdp's layout: codes (blocks, blocksize / 2) and absmax (blocks,) as frozen parameters,
    so FSDP2's dim-0 shards hold whole blocks with their scales; the same bits, outputs and state
    dict as the buffers, and a float32 absmax (no double quant) survives a dtype cast."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = tq.NF4Linear.from_linear(linear, blocksize=32, double_quant=double_quant)
    flat = layer.qweight
    x = torch.randn(3, 96)
    want, want_sd = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    assert not layer.sharded_by_blocks and layer.shard_by_blocks() and layer.sharded_by_blocks
    blocks = 96 * 40 // 32
    assert dict(layer.named_parameters())["weight"].shape == (blocks, 16)
    assert dict(layer.named_parameters())["absmax"].shape == (blocks,)
    assert not any(p.requires_grad for n, p in layer.named_parameters() if n in ("weight", "absmax"))
    # a rank's rows of codes and absmax are the same blocks: row k of each is block k
    assert torch.equal(layer.weight[5], flat.packed.view(-1)[5 * 16 : 6 * 16])
    assert torch.equal(layer.absmax[5], flat.absmax[5])
    assert torch.equal(layer.dequantize(), tq.dequantize(flat, torch.float32))
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    # FSDP2 frees and reallocates the storage it gathers a layer into: reading it must leave it resizable
    for name in ("weight", "absmax"):
        getattr(layer, name).data = getattr(layer, name).data.clone()  # fresh storage, as FSDP2's
    layer(x).sum()
    for name in ("weight", "absmax"):
        storage = getattr(layer, name).untyped_storage()
        storage.resize_(storage.nbytes())
    got_sd = layer.state_dict()  # still bitsandbytes' flat layout
    assert set(got_sd) == set(want_sd) and all(torch.equal(got_sd[k].view(-1), v.view(-1)) for k, v in want_sd.items())
    assert not layer.shard_by_blocks()  # once only
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert isinstance(layer.absmax, torch.nn.Parameter) and torch.equal(
        layer.dequantize(), tq.dequantize(flat, torch.float32)
    )


def test_shard_by_blocks_leaves_a_weight_of_partial_blocks_replicated():
    layer = tq.NF4Linear.from_linear(torch.nn.Linear(33, 3), blocksize=32)  # 99 elements: 3 blocks and 3 more
    assert not layer.shard_by_blocks() and not layer.sharded_by_blocks
    assert "weight" in dict(layer.named_buffers())
