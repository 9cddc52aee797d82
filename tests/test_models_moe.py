"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers + PEFT (the
oracles), on tiny random models transformers made and saved (fp32, head dims multiples of 16).

- logits, packed rows against documents one by one, KV-cache greedy decoding against ``generate``;
- in training mode, the loss (with and without the router's load-balancing loss) and the gradient
  of every LoRA parameter against PEFT, whose experts are transformers' stacked 3-D parameters
  adapted through ``target_parameters``: tunex's per-expert LoRAs on ``gate``/``up`` equal PEFT's one
  LoRA on each expert's fused ``gate_up_proj`` when both share A and split B (so A's gradient
  is the sum of theirs);
- an adapter tunex exports (per expert, under the checkpoint's names) loads in PEFT with tunex's
  logits, and ``convert merge`` of it equals PEFT's ``merge_and_unload``;
- QLoRA packs the experts but not the routers.
"""

from __future__ import annotations

import pytest
import torch
from _hf_families import BASE, MOE, hf_model
from _model_checks import (
    assert_greedy_matches_generate,
    assert_packed_rows_match_documents,
    documents_loss,
    greedy_chat_and_generate,
    packed_documents,
    spy_kernel_choices,
)
from conftest import require_native
from tunex.dist.wrap import LossModule
from tunex.models import load_model
from tunex.peft import apply_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = list(MOE)
TOL = 1e-4
R, ALPHA = 4, 8
NATIVE = ("rms_norm_forward_f32", "rope_f32", "attention_forward_f32", "swiglu_forward_f32", "lora_down_f32")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return folder, hf, load_model(folder)


def test_logits_match_transformers(pair):
    _, hf, ours = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=TOL)


def test_packed_batch_matches_documents_one_by_one(pair):
    _, hf, ours = pair
    assert_packed_rows_match_documents(hf, ours, BASE["vocab_size"])


def test_state_dict_keys_are_the_checkpoint_keys(pair):
    folder, _, ours = pair
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert set(ours.state_dict()) == set(f.keys())


def test_kv_cache_greedy_matches_transformers_generate(pair):
    _, hf, ours = pair
    assert_greedy_matches_generate(hf, ours)


# ---- training: LoRA loss and gradients against PEFT ------------------------------------------------


class _Pair:
    """One comparison: tunex's value/gradient (possibly summed over several parameters) against a
    slice of a PEFT parameter."""

    def __init__(self, name, ours, theirs, pick):
        self.name, self.ours, self.theirs, self.pick = name, ours, theirs, pick

    def set_ours(self):
        with torch.no_grad():
            value = self.pick(self.theirs.detach())
            assert bool(value.abs().sum() > 0), self.name
            for p in self.ours:
                p.copy_(value)

    def check(self):
        for p in self.ours:
            assert p.grad is not None, self.name
        got = sum(p.grad for p in self.ours)
        expected = self.pick(self.theirs.grad)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=self.name)


def _expert_names(family: str):
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def adapted_pair(tmp_path, family: str, coef: float = 0.0, router: bool = False):
    """tunex with LoRA on every linear and PEFT with LoRA on the same projections (the experts through
    ``target_parameters``), the same non-zero adapter weights, both in training mode; with ``coef``
    the router's load-balancing loss is on in both. ``router``: the routers are adapted too."""
    overrides = dict(output_router_logits=True, router_aux_loss_coef=coef) if coef else {}
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / family)
    ours = load_model(tmp_path / family)
    ours.router_aux_loss_coef = coef
    params = ["experts.gate_up_proj", "experts.down_proj"] + (["mlp.gate.weight"] if router else [])
    dense = family == "qwen2_moe"  # a shared expert and a dense layer
    ref = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            # the dense MLPs' names only where the model has dense MLPs: otherwise PEFT reads them as
            # transformers 4's expert names and adapts the experts its own way
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            + (["gate_proj", "up_proj", "down_proj"] if dense else []),
            target_parameters=params,
            init_lora_weights=False,
        ),
    )
    targets = "all-linear" if not router else r".*(_proj|\.w[123]|\.gate)$"
    apply_lora(ours, targets, R, ALPHA)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs = {
        n.removeprefix("base_model.model.").replace(".default", ""): p
        for n, p in ref.named_parameters()
        if p.requires_grad
    }
    wrappers = {
        (n.removeprefix("base_model.model."), m.parameter_name): m
        for n, m in ref.named_modules()
        if isinstance(m, peft.tuners.lora.layer.ParamWrapper)
    }
    cfg = ours.config
    gate_n, up_n, down_n = _expert_names(family)
    pairs, used = [], set()
    for name, p in mine.items():
        if ".experts." not in name and ".gate.lora_" not in name:
            pairs.append(_Pair(name, [p], theirs[name], lambda t: t))
            used.add(name)
    for layer in range(cfg.num_layers):
        if not cfg.sparse_layers[layer]:
            continue
        ffn = "block_sparse_moe" if family == "mixtral" else "mlp"
        ours_prefix = f"model.layers.{layer}.{ffn}"
        hf_prefix = f"model.layers.{layer}.mlp"
        E, inter = cfg.num_experts, cfg.moe_intermediate_size
        for param, projs in (("gate_up_proj", (gate_n, up_n)), ("down_proj", (down_n,))):
            wrapper = next(m for (n, pn), m in wrappers.items() if n.startswith(hf_prefix + ".experts") and pn == param)
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            for e in range(E):
                base = f"{ours_prefix}.experts.{e}"
                # A: (E*r, in) -> expert e's rows; B: (out, r*E) -> columns e, e+E, ... (PEFT's layout)
                pairs.append(
                    _Pair(
                        f"{base} A of {param}",
                        [mine[f"{base}.{x}.lora_A.weight"] for x in projs],
                        a,
                        lambda t, e=e: t.view(E, R, -1)[e],
                    )
                )
                for j, x in enumerate(projs):
                    rows = slice(j * inter, (j + 1) * inter) if len(projs) == 2 else slice(None)
                    pairs.append(
                        _Pair(
                            f"{base}.{x} B",
                            [mine[f"{base}.{x}.lora_B.weight"]],
                            b,
                            lambda t, e=e, rows=rows: t.view(t.shape[0], R, E)[rows, :, e],
                        )
                    )
                    used |= {f"{base}.{x}.lora_A.weight", f"{base}.{x}.lora_B.weight"}
        if router:
            wrapper = wrappers[(hf_prefix + ".gate", "weight")]
            for kind in ("A", "B"):
                name = f"{ours_prefix}.gate.lora_{kind}.weight"
                pairs.append(_Pair(name, [mine[name]], getattr(wrapper, f"lora_{kind}")["default"].weight, lambda t: t))
                used.add(name)
    assert used == set(mine), set(mine) - used
    assert len(theirs) == len({id(x.theirs) for x in pairs})  # every PEFT parameter compared
    for x in pairs:
        x.set_ours()
    return ours.train(), ref.train(), pairs


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


@pytest.mark.parametrize("checkpointing", [False, True], ids=["lean", "checkpointing"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loss_and_grads_match_peft(tmp_path, monkeypatch, family, checkpointing):
    require_native(*NATIVE, "cross_entropy_f32")
    ours, ref, pairs = adapted_pair(tmp_path, family)
    ours.gradient_checkpointing = checkpointing
    ids, labels = _batch(5)
    chosen = spy_kernel_choices(monkeypatch)
    loss = LossModule(ours)(ids, labels, None)
    loss.backward()
    # the native CPU kernels ran (the experts' adapted projections and SwiGLU included)
    for op, impl in {"rmsnorm": "native", "rope": "native", "swiglu": "native", "lora_linear": "fused-native"}.items():
        assert impl in chosen.get(op, set()), (op, chosen.get(op))
    expected = ref(input_ids=ids, labels=labels).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for x in pairs:
        x.check()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_lora_loss_and_grads_match_documents_one_by_one(tmp_path, family):
    """Packed rows (position ids restarting per document) against transformers + PEFT on each
    document alone, the losses summed over the same target tokens."""
    require_native(*NATIVE)
    ours, ref, pairs = adapted_pair(tmp_path, family)
    ids, labels, pos, docs = packed_documents(BASE["vocab_size"])
    loss = LossModule(ours)(ids, labels, pos)
    loss.backward()
    expected = documents_loss(ref, docs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for x in pairs:
        x.check()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_chat_equals_transformers_generate(tmp_path, family):
    """SmolLM2's real tokenizer and chat template on a tiny random MoE model of the family."""
    hf = hf_model(family, vocab_size=49152, bos_token_id=1, eos_token_id=2)
    result, _, expected = greedy_chat_and_generate(hf, tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_router_load_balancing_loss_matches_transformers(tmp_path, family):
    """``router_aux_loss_coef`` > 0: the loss gains coef x the load-balancing loss, as transformers
    adds it (output_router_logits), and its gradient reaches the LoRA parameters (a big coefficient
    makes its share visible); the routers are adapted here, so their gradient comes from it too."""
    ours, ref, pairs = adapted_pair(tmp_path, family, coef=0.5, router=True)
    ours.gradient_checkpointing = True  # the recomputed forward must not count twice
    ids, labels = _batch(7)
    loss = LossModule(ours)(ids, labels, None)
    loss.backward()
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    assert float(out.aux_loss) > 0
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    for x in pairs:
        x.check()
    # off (the default): the plain cross-entropy
    ours.router_aux_loss_coef = 0.0
    with torch.no_grad():
        plain = LossModule(ours)(ids, labels, None)
    torch.testing.assert_close(plain + 0.5 * out.aux_loss, out.loss, rtol=1e-5, atol=1e-5)


# ---- export and merge ---------------------------------------------------------------------------


def _random_adapter(ours, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _export(ours, folder):
    from tunex.peft import export_adapter, trainable_state_dict

    method = type("M", (), dict(target_modules="all-linear", alpha=8.0, dropout=0.0, r=4, use_dora=False))()
    method.use_rslora = False
    export_adapter(trainable_state_dict(ours), method, folder, dtype=torch.float32)


IDS = torch.tensor([[1, 5, 9, 2, 33, 60, 7, 12, 40, 3, 77]])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_exported_adapter_loads_in_peft_with_tunex_logits(tmp_path, family):
    """PEFT reads an adapter written under transformers 4's per-expert names into transformers 5's
    stacked experts (for Qwen2-MoE it does not: it drops the experts' LoRAs; see the merge test)."""
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    apply_lora(ours, "all-linear", 4, 8.0)
    _random_adapter(ours, 2)
    _export(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = ours.eval()(IDS)
        torch.testing.assert_close(got, loaded(IDS).logits, atol=TOL, rtol=TOL)
        torch.testing.assert_close(got, loaded.merge_and_unload()(IDS).logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_merge_equals_peft_merge_and_unload(tmp_path, family):
    """tunex's adapter (all linears, routers included) exported and merged by ``convert merge``
    against PEFT's ``merge_and_unload`` of the same adapter on transformers' stacked experts."""
    from click.testing import CliRunner
    from tunex.cli import cli

    ours, ref, _ = adapted_pair(tmp_path, family, router=True)
    _export(ours, tmp_path / "adapter")
    with torch.no_grad():
        expected = ref.eval().merge_and_unload()(IDS).logits
        torch.testing.assert_close(ours.eval()(IDS), expected, atol=TOL, rtol=TOL)
    result = CliRunner().invoke(
        cli, ["convert", "merge", str(tmp_path / family), str(tmp_path / "adapter"), str(tmp_path / "merged"), "-q"]
    )
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(load_model(tmp_path / "merged")(IDS), expected, atol=TOL, rtol=TOL)


def test_qlora_packs_experts_and_keeps_routers_dense(tmp_path):
    from tunex.quant import NF4Linear

    hf = hf_model("qwen2_moe")
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, quantize=lambda n, lin: NF4Linear.from_linear(lin))
    block = model.model.layers[0].mlp
    assert isinstance(block.experts[3].down_proj, NF4Linear) and isinstance(block.shared_expert.up_proj, NF4Linear)
    assert type(block.gate).__name__ == "Router" and type(block.shared_expert_gate).__name__ == "Router"
    assert isinstance(model.model.layers[1].mlp.gate_proj, NF4Linear)  # the dense layer
    names = apply_lora(model, "all-linear", 4, 8.0)
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert not any(n.endswith(".gate") or n.endswith("shared_expert_gate") for n in names)
    from tunex.quant.checkpoint import is_quantized_weight  # `tunex quantize` keeps routers dense too

    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
        assert not is_quantized_weight(name, torch.float32, (4, 64))
    assert not is_quantized_weight("model.layers.3.block_sparse_moe.gate.weight", torch.float32, (8, 64))
    assert is_quantized_weight("model.layers.3.block_sparse_moe.experts.1.w1.weight", torch.float32, (32, 64))
    assert is_quantized_weight("model.layers.0.mlp.gate_proj.weight", torch.float32, (32, 64))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():  # NF4 rounding moves the logits a little, not the routing of most tokens
        assert float((model(ids) - hf(ids).logits).abs().mean()) < 0.05


# ---- tunex estimate -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_shape_counts_the_parameters_tunex_builds(tmp_path, family):
    """The estimate's shape of a MoE config.json (experts, shared expert, routers) against the
    parameters of the model tunex loads from it, and its QLoRA targets against the linears QLoRA packs."""
    from tunex.estimate import adapted_linears, shape_from_config_json

    overrides = {"mlp_only_layers": []} if family == "qwen2_moe" else {}
    hf_model(family, **overrides).save_pretrained(tmp_path)
    shape = shape_from_config_json(tmp_path)
    model = load_model(tmp_path)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    c = model.config
    idle = c.num_layers * (c.num_experts - c.experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    assert shape.active_params() == shape.params() - idle
    names = apply_lora(model, "all-linear", 4, 8.0)
    assert sorted(names) == sorted(f"model.layers.{i}.{n}" for i in range(c.num_layers) for n, _, _ in shape.linears())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted = adapted_linears(shape, "all-linear")
    assert trainable == shape.layers * sum(4 * (i + o) for _, i, o in adapted)


def test_estimate_of_the_mixtral_config_reports_experts_and_active_parameters():
    from click.testing import CliRunner
    from tunex.cli import cli
    from tunex.estimate import PRESETS

    # the published totals: Mixtral-8x7B 46.7B (12.9B active), Qwen1.5-MoE-A2.7B 14.3B (2.7B active),
    # Qwen3-30B-A3B 30.5B (3.3B active)
    for preset, total, active in (
        ("mixtral-8x7b", 46.7, 12.9),
        ("qwen1.5-moe-a2.7b", 14.3, 2.7),
        ("qwen3-30b-a3b", 30.5, 3.3),
    ):
        assert abs(PRESETS[preset].params() / 1e9 - total) < 0.06
        assert abs(PRESETS[preset].active_params() / 1e9 - active) < 0.06
    result = CliRunner().invoke(cli, ["estimate", "mixtral_8x7b_instruct_qlora_oasst1_e3"])
    assert result.exit_code == 0, result.output
    assert "46.703 B params" in result.output and "8 experts, 2 per token" in result.output
    assert "12.880 B active params" in result.output


# ---- tunex train end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_train_with_the_load_balancing_loss_then_pth_to_hf_and_merge(tmp_path, kind):
    """`tunex train` on a tiny Mixtral with train.router_aux_loss_coef, then the adapter in PEFT's
    per-expert names and `convert merge`; the same key on a dense model is a one-line error."""
    import json

    from click.testing import CliRunner
    from test_train_helpers import make_data, make_tiny_model, make_tokenizer, write_config
    from tunex.cli import cli
    from tunex.train.metrics import read_metrics

    folder = tmp_path / "mixtral"
    vocab = make_tokenizer(folder)
    hf_model("mixtral", vocab_size=vocab, eos_token_id=2, bos_token_id=None, pad_token_id=0).save_pretrained(folder)
    work = tmp_path / "work"
    cfg = write_config(
        tmp_path / "c.toml",
        folder,
        make_data(tmp_path / "d", "pretrain"),
        kind,
        "pretrain",
        work,
        lr=2e-2,
        max_steps=12,
        router_aux_loss_coef=0.02,
        gradient_checkpointing=True,
    )
    result = CliRunner().invoke(cli, ["train", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in read_metrics(work)]
    assert len(losses) == 12 and sum(losses[-2:]) / 2 < 0.9 * losses[0], losses
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["convert", "pth_to_hf", str(cfg), str(work / "iter_12.pth"), str(out)])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight" in keys
    assert not any(".gate." in k for k in keys)  # the routers are not adapted
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    result = CliRunner().invoke(cli, ["convert", "merge", str(folder), str(out), str(tmp_path / "merged"), "-q"])
    assert result.exit_code == 0, result.output

    dense = make_tiny_model(tmp_path / "llama")
    cfg = write_config(
        tmp_path / "d.toml",
        dense,
        make_data(tmp_path / "d", "pretrain"),
        kind,
        "pretrain",
        tmp_path / "w2",
        router_aux_loss_coef=0.02,
    )
    result = CliRunner().invoke(cli, ["train", str(cfg)])
    assert result.exit_code != 0
    assert "train.router_aux_loss_coef: llama has no router" in result.output
    assert not (tmp_path / "w2").exists()
