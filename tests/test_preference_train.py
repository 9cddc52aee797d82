"""Preference objectives against TRL (the test oracle): the same pairs and weights in tunex (one row per
pair, LoRA, reference with adapters off) and in transformers + PEFT (chosen and rejected rows, the
reference by PEFT's disable_adapter), the log-probs of the latter fed to TRL's own loss code:
DPOTrainer's loss (sigmoid, IPO), CPOTrainer's (SimPO; sigmoid with label smoothing), ORPOTrainer's
odds-ratio loss. Losses, metrics and every LoRA gradient must agree."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_train_helpers import QA, make_tiny_model
from tunex.data import collate
from tunex.data.dataset import build_dataset
from tunex.train.preference import METRICS, Objective, PreferenceLoss, token_logps

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8.0


def test_token_logps_values_and_gradients_match_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (2, 7))
    y[0, :3] = -100
    g = torch.randn(2, 7)
    # a trained head (full fine-tune: logits recomputed in backward) and a frozen one (LoRA: the
    # hidden state's gradient direction kept from forward)
    for cap, frozen in itertools.product((None, 5.0), (False, True)):
        head = (w.detach(), b.detach()) if frozen else (w, b)
        got = token_logps(h, *head[:1], y, head[1], cap)
        z = F.linear(h, *head)
        z = torch.tanh(z / cap) * cap if cap else z
        want = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        wrt = (h,) if frozen else (h, w, b)
        ours = torch.autograd.grad((got * g).sum(), wrt)
        theirs = torch.autograd.grad((want * g).sum(), wrt)
        for a, c in zip(ours, theirs):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model with LoRA (B random, so policy and reference differ) in tunex and in PEFT, and
    one batch of four pairs in both layouts."""
    from tunex.models import load_model
    from tunex.peft import apply_lora
    from tunex.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("pref")
    folder = make_tiny_model(root / "m")
    data = root / "p.jsonl"
    rows = [{"prompt": q, "chosen": a, "rejected": " ".join(reversed(a.split()))} for q, a in QA[:4]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SimpleNamespace(
        path=str(data),
        format="preference",
        template="auto",
        system="",
        max_length=64,
        pack_to_max_length=False,
        shuffle_before_pack=False,
        num_workers=0,
        cache_dir="",
    )
    ds = build_dataset(cfg, load_tokenizer(folder), seed=0, cache_dir=root / "cache")
    batch = collate([ds[i] for i in range(len(ds))], pad_id=0)

    torch.manual_seed(1)
    ours = load_model(folder)
    apply_lora(ours, "all-linear", R, ALPHA, dropout=0.0)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    ours.train()

    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    lora_cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    theirs = peft.get_peft_model(base, lora_cfg)
    state = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    mapping = {}
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            p.data.copy_(state[key])
            mapping[key] = name
    assert len(mapping) == len(state)
    theirs.train()

    # TRL's layout: B chosen rows, then B rejected rows, each side right-padded
    sides = [[], []]
    for i in range(len(ds)):
        for s in (0, 1):
            ids, mask = ds.store.sample(2 * i + s)
            sides[s].append((torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)))
    seqs = sides[0] + sides[1]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for row, (ids, mask) in enumerate(seqs):
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        completion[row, : len(ids)] = mask
    hf = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    return SimpleNamespace(ours=ours, theirs=theirs, mapping=mapping, batch=batch, hf=hf, pairs=len(ds))


def hf_token_logps(model, hf):
    """(2B, T-1) log-probs of each completion token (0 elsewhere), by transformers + PEFT."""
    logits = model(input_ids=hf["input_ids"], attention_mask=hf["attention_mask"]).logits.float()
    labels = hf["input_ids"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[..., None]).squeeze(-1)
    return lp * hf["completion_mask"][:, 1:], logits


def fake_outputs(tok_logps, logits):
    return SimpleNamespace(
        log_probs=tok_logps,
        entropy=torch.zeros_like(tok_logps),
        mean_logits=logits[:, :-1].mean(-1).detach(),
        is_top1=torch.zeros_like(tok_logps, dtype=torch.bool),
    )


def accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)


def trl_dpo(setup, loss_type, beta):
    """DPOTrainer's own loss code on log-probs computed by transformers + PEFT."""
    from trl import DPOTrainer

    hf = setup.hf
    with torch.no_grad(), setup.theirs.disable_adapter():
        ref, _ = hf_token_logps(setup.theirs, hf)
    ref_c, ref_r = ref.sum(1).chunk(2)
    tok, logits = hf_token_logps(setup.theirs, hf)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = dict(hf, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: fake_outputs(tok, logits), inputs, False)
    metrics = {k: trainer._metrics["train"][k][0] for k in METRICS}
    return loss, metrics


def trl_reference_free(setup, name, beta, smoothing, gamma):
    """CPOTrainer's loss (SimPO; sigmoid, fed DPO's log-ratios) or ORPOTrainer's odds-ratio loss."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    hf = setup.hf
    tok, _ = hf_token_logps(setup.theirs, hf)
    counts = hf["completion_mask"][:, 1:].sum(1)
    if name == "dpo":
        with torch.no_grad(), setup.theirs.disable_adapter():
            ref, _ = hf_token_logps(setup.theirs, hf)
        c, r = (tok.sum(1) - ref.sum(1)).chunk(2)
        fake = SimpleNamespace(
            alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=smoothing, accelerator=accelerator()
        )
        losses, _, _ = CPOTrainer.cpo_loss(fake, c, r)
        return losses.mean()
    c, r = (tok.sum(1) / counts).chunk(2)
    if name == "simpo":
        fake = SimpleNamespace(
            alpha=0.0,
            beta=beta,
            loss_type="simpo",
            simpo_gamma=gamma,
            label_smoothing=smoothing,
            accelerator=accelerator(),
        )
        losses, _, _ = CPOTrainer.cpo_loss(fake, c, r)
        return losses.mean()
    chosen_rows = slice(0, setup.pairs)
    nll = -tok[chosen_rows].sum() / counts[chosen_rows].sum()  # the chosen response tokens' mean NLL
    losses, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=accelerator()), c, r)
    return nll - losses.mean()


def tunex_loss(setup, objective):
    b = setup.batch
    return PreferenceLoss(setup.ours, objective)(b["input_ids"], b["labels"], b["position_ids"])


def compare_gradients(setup, ours_loss, theirs_loss):
    for p in list(setup.ours.parameters()) + list(setup.theirs.parameters()):
        p.grad = None
    ours_loss.backward()
    theirs_loss.backward()
    got = {n: p.grad for n, p in setup.ours.named_parameters() if p.requires_grad}
    want = dict(setup.theirs.named_parameters())
    assert any(float(g.abs().max()) > 0 for g in got.values())
    for key, name in setup.mapping.items():
        theirs = want[name].grad  # float32 sums in another order: tolerances scaled to the tensor
        scale = float(theirs.abs().max())
        torch.testing.assert_close(got[key], theirs, rtol=1e-3, atol=2e-4 * scale, msg=lambda m: f"{key}: {m}")
        assert float((got[key] - theirs).norm()) <= 1e-4 * float(theirs.norm()) + 1e-9, key


@pytest.mark.parametrize("loss_type, name", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_and_ipo_match_trl_dpo_trainer(setup, loss_type, name):
    beta = 0.3
    objective = Objective(name, beta, 0.0, 0.5, reference=True, normalize=name == "ipo")
    loss, stats = tunex_loss(setup, objective)
    theirs, metrics = trl_dpo(setup, loss_type, beta)
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-6)
    if name == "dpo":  # TRL's metrics (its IPO rewards use the summed log-ratios, tunex the objective's)
        ours = {k: float(stats[i] / stats[-1]) for i, k in enumerate(METRICS)}
        assert ours == pytest.approx(metrics, rel=1e-4, abs=1e-5)
        assert 0 < metrics["rewards/accuracies"] < 1  # a batch that tells accuracy apart from margin
    compare_gradients(setup, loss, theirs)


@pytest.mark.parametrize(
    "name, smoothing",
    [("simpo", 0.0), ("simpo", 0.1), ("orpo", 0.0), ("dpo", 0.2)],  # dpo + smoothing: conservative DPO
)
def test_reference_free_objectives_and_smoothing_match_trl(setup, name, smoothing):
    beta, gamma = 0.7, 0.4
    objective = Objective(name, beta, smoothing, gamma, reference=name == "dpo", normalize=name != "dpo")
    loss, _ = tunex_loss(setup, objective)
    theirs = trl_reference_free(setup, name, beta, smoothing, gamma)
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-6)
    compare_gradients(setup, loss, theirs)
