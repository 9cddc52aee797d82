"""Preference objectives (DPO, IPO, ORPO, SimPO) as functions of the policy's response log-probs,
and reward models (a scalar head on each side's last token, Bradley-Terry loss).

A micro-batch row holds one pair: the chosen sample, then the rejected one, as two documents
(``position_ids`` restart, so neither attends to the other) and padding after them. One forward
gives every token's hidden state; :func:`token_logps` turns them into the log-probability of each
target token without keeping a (tokens x vocab) tensor for backward; per-row sums over each
document's targets give the chosen and rejected log-probs (divided by their token counts when
``length_normalize``).

The reference log-probs (DPO, IPO with ``reference = "model"``) come from the same model: for
LoRA/QLoRA the forward runs again without grad with every adapter switched off (the base layers
swapped in: no second copy of any weight); for a full fine-tune they are computed once before
training and cached on disk beside the token cache (:mod:`tunex.train.reference`).

The losses follow TRL's trainers (tests compare them): DPO's sigmoid loss with conservative label
smoothing, IPO's squared loss on length-normalized log-ratios, ORPO's NLL minus beta x log-sigmoid
of the log odds ratio (the NLL over the chosen response tokens), SimPO's sigmoid loss with the
margin gamma / beta. Metrics carry TRL's names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_ROWS_ELEMENTS = 1 << 24  # fp32 logits per chunk, as tunex.train.loss
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
_STATS = len(METRICS) + 1  # the metrics' sums over pairs, then the pair count


# ---- per-token log-probs, chunked ----------------------------------------------------------------


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None) -> torch.Tensor:
    z = F.linear(h.to(weight.dtype), weight, bias).float()  # (c, V)
    return torch.tanh(z / cap) * cap if cap else z


class _TokenLogps(torch.autograd.Function):
    """log softmax(h @ W.T + b)[label] per row, in chunks of rows.

    With a frozen head (LoRA, QLoRA) forward also keeps each row's d logp / d h, which needs no
    incoming gradient: ``W[label] - softmax @ W`` (times the soft-cap's derivative when capped), one
    (rows, H) tensor; backward only scales it. A trained head (full fine-tune) needs the logits
    again for its own gradient: backward recomputes them chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, cap, rows, grad_wanted):
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        head_trained = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        direct = grad_wanted and ctx.needs_input_grad[0] and not head_trained
        slope = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if direct else None
        for start in range(0, hidden.shape[0], rows):
            z = _logits(hidden[start : start + rows], weight, bias, cap)
            y = safe[start : start + rows, None]
            picked = z.gather(1, y).squeeze(1)
            lse = torch.logsumexp(z, dim=1)
            out[start : start + rows] = (picked - lse) * valid[start : start + rows]
            if slope is not None:
                at_label = weight[y.squeeze(1)].float()
                if cap:  # through cap * tanh(raw / cap): times 1 - tanh^2 (z is the capped logit)
                    p = torch.exp(z - lse[:, None]).mul_(1 - (z / cap) ** 2)
                    at_label.mul_((1 - (picked / cap) ** 2)[:, None])
                else:
                    p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                pushed = (p.to(weight.dtype) @ weight).float()
                slope[start : start + rows] = (at_label - pushed) * valid[start : start + rows, None]
        if slope is not None:
            ctx.save_for_backward(slope)
        else:
            ctx.save_for_backward(hidden, weight, bias, safe, valid)
        ctx.direct, ctx.cap, ctx.rows = slope is not None, cap, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.direct:
            (slope,) = ctx.saved_tensors
            return slope * grad_out.float()[:, None], None, None, None, None, None, None
        hidden, weight, bias, safe, valid = ctx.saved_tensors
        cap, rows = ctx.cap, ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g_rows = grad_out.float() * valid
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            z = _logits(h, weight, bias, cap)
            # d logp / d z = onehot - softmax, times the incoming gradient of the row
            g = torch.softmax(z, dim=1).mul_(-g_rows[start : start + rows, None])
            g.scatter_add_(1, safe[start : start + rows, None], g_rows[start : start + rows, None])
            if cap:  # through cap * tanh(raw / cap): times 1 - tanh^2
                g.mul_(1 - (z / cap) ** 2)
            if need_h:
                grad_h[start : start + rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None, cap=None
) -> torch.Tensor:
    """fp32 log-probability of each label under ``hidden @ weight.T (+ bias)`` (soft-capped by
    ``cap`` when given); 0 where the label is -100.

    Args:
        hidden: (..., H) hidden states aligned with ``labels`` (already shifted).
        weight: (V, H) output head; bias: (V,) or None.
        labels: (...) token ids or -100.

    Returns:
        (...) fp32, differentiable with respect to hidden, weight and bias; peak extra memory is
        one chunk of logits in forward and in backward (which recomputes them).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    rows = max(1, CHUNK_ROWS_ELEMENTS // max(weight.shape[0], 1))
    counted = (y != IGNORE_INDEX).nonzero().squeeze(1)
    if counted.numel() == y.numel():
        return _TokenLogps.apply(h, weight, bias, y, cap or None, rows, torch.is_grad_enabled()).view(labels.shape)
    # the head's products on the counted rows only (prompts and padding are a third or more of a pair)
    picked = _TokenLogps.apply(
        h.index_select(0, counted), weight, bias, y[counted], cap or None, rows, torch.is_grad_enabled()
    )
    return picked.new_zeros(y.shape).index_copy(0, counted, picked).view(labels.shape)


def documents(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) 1-based document index of each token: a new document where the position does not step by +1."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()
    return starts.cumsum(1)


def pair_logps(tok: torch.Tensor, labels: torch.Tensor, docs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(chosen sums, rejected sums, chosen counts, rejected counts), each (B,), from per-token log-probs
    ``tok`` (B, T-1) of the shifted labels; document 1 of a row is chosen, document 2 rejected."""
    y, d = labels[:, 1:], docs[:, 1:]
    valid = y != IGNORE_INDEX
    out = []
    for doc in (1, 2):
        on = valid & (d == doc)
        out.append((tok * on).sum(1))
    for doc in (1, 2):
        out.append((valid & (d == doc)).sum(1).to(tok.dtype))
    return tuple(out)


# ---- the objectives ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    name: str  # dpo | ipo | orpo | simpo | reward
    beta: float
    label_smoothing: float
    gamma: float
    reference: bool
    normalize: bool

    @classmethod
    def of(cls, cfg: Any) -> Objective | None:
        """The config's preference objective, or None for ``train.objective = "sft"``."""
        name = cfg.train.objective
        if name == "sft":
            return None
        p = cfg.preference
        return cls(name, p.beta, p.label_smoothing, p.gamma, p.uses_reference(name), p.normalizes(name))

    def loss(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        ref_chosen: torch.Tensor | None = None,
        ref_rejected: torch.Tensor | None = None,
        nll: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss over the pairs, chosen rewards, rejected rewards) from the (B,) log-probs.

        ``ref_*``: the reference's log-probs (None: reference-free, as zeros). ``nll``: ORPO's mean
        negative log-likelihood of the chosen response tokens.
        """
        beta, eps = self.beta, self.label_smoothing
        if self.name in ("dpo", "ipo"):
            rc = torch.zeros_like(chosen) if ref_chosen is None else ref_chosen
            rr = torch.zeros_like(rejected) if ref_rejected is None else ref_rejected
            margin = (chosen - rc) - (rejected - rr)
            if self.name == "dpo":
                losses = -F.logsigmoid(beta * margin) * (1 - eps) - F.logsigmoid(-beta * margin) * eps
            else:
                losses = (margin - 1 / (2 * beta)) ** 2
            return losses.mean(), beta * (chosen - rc).detach(), beta * (rejected - rr).detach()
        if self.name == "simpo":
            z = beta * (chosen - rejected) - self.gamma
            losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
            return losses.mean(), beta * chosen.detach(), beta * rejected.detach()
        if self.name == "orpo":
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            ratio = F.logsigmoid(log_odds)
            return nll - beta * ratio.mean(), beta * chosen.detach(), beta * rejected.detach()
        raise ValueError(f"train.objective: unknown preference objective {self.name!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ---- the reference: the same model with its adapters off -------------------------------------------


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every LoRA layer is swapped for its frozen base layer (a plain
    linear over the same weight tensors, or the quantized layer) and swapped back after."""
    from tunex.peft.targets import lora_modules

    swapped = []
    for name, layer in list(lora_modules(model)):
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        setattr(parent, attr, _base_of(layer))
        swapped.append((parent, attr, layer))
    try:
        yield
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)


def _base_of(layer: nn.Module) -> nn.Module:
    if layer.base_layer is not None:
        return layer.base_layer
    base = getattr(layer, "_tunex_base", None)
    if base is None:
        base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        base.weight = layer.weight  # the same Parameter: nothing copied
        if layer.bias is not None:
            base.bias = layer.bias
        object.__setattr__(layer, "_tunex_base", base)  # not a submodule: no second state-dict entry
    return base


# ---- the loss module the loop trains through ---------------------------------------------------------


class PreferenceLoss(nn.Module):
    """``forward(input_ids, labels, position_ids, reference=None) -> (loss, stats)`` for pair rows.

    ``reference``: (B, 2) cached reference log-probs (full fine-tune), or None to compute them
    with the adapters off when the objective has a reference. ``stats``: (7,) detached sums over the
    micro-batch's pairs of :data:`METRICS`, then the pair count.
    """

    def __init__(self, lm: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.lm = lm
        self.objective = objective

    def sequence_logps(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """(chosen, rejected, chosen sums, chosen counts) log-probs of each row's two responses."""
        from tunex.train.build import forward_hidden, output_head

        hidden = forward_hidden(self.lm, input_ids, position_ids)  # (B, T, H)
        weight, bias = output_head(self.lm)
        tok = token_logps(hidden[:, :-1], weight, labels[:, 1:], bias, getattr(self.lm, "logit_softcap", None))
        c_sum, r_sum, c_n, r_n = pair_logps(tok, labels, documents(position_ids))
        if self.objective.normalize:
            return c_sum / c_n.clamp(min=1), r_sum / r_n.clamp(min=1), c_sum, c_n
        return c_sum, r_sum, c_sum, c_n

    def forward(self, input_ids, labels, position_ids, reference=None):
        obj = self.objective
        ref_c = ref_r = None
        if obj.reference:
            if reference is None:
                with torch.no_grad(), adapters_off(self.lm):
                    ref_c, ref_r, _, _ = self.sequence_logps(input_ids, labels, position_ids)
            else:
                ref_c, ref_r = reference[:, 0].to(torch.float32), reference[:, 1].to(torch.float32)
        chosen, rejected, c_sum, c_n = self.sequence_logps(input_ids, labels, position_ids)
        nll = -c_sum.sum() / c_n.sum().clamp(min=1) if obj.name == "orpo" else None
        loss, r_c, r_r = obj.loss(chosen, rejected, ref_c, ref_r, nll)
        stats = torch.stack(
            [
                r_c.sum(),
                r_r.sum(),
                (r_c > r_r).float().sum(),
                (r_c - r_r).sum(),
                chosen.detach().sum(),
                rejected.detach().sum(),
                torch.tensor(float(len(chosen)), device=chosen.device),
            ]
        )
        return loss, stats


class PreferenceSteps:
    """The loop's side of a preference objective: each micro-step's forward/backward, and the
    step's TRL-named metrics (means over every pair of the step, on all ranks)."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.sums: torch.Tensor | None = None

    def micro_step(self, step_module, batch, device, cfg, accum: int, last: bool = True, scaler=None):
        from tunex.dist.wrap import gradient_sync
        from tunex.train.build import autocast

        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        positions = batch["position_ids"].to(device)
        reference = batch.get("reference")
        reference = reference.to(device) if reference is not None else None
        with gradient_sync(step_module, last):
            with autocast(cfg.train.dtype, device):
                loss, stats = step_module(input_ids, labels, positions, reference)
            (loss / accum if scaler is None else scaler.scale(loss / accum)).backward()
        stats = stats.detach().double()
        self.sums = stats if self.sums is None else self.sums + stats
        return loss.detach(), int(input_ids.numel())

    def step_metrics(self, env) -> dict[str, float]:
        """The step's metrics (all ranks' pairs); resets the sums for the next step."""
        sums, self.sums = self.sums, None
        if sums is None:
            return {}
        if env.enabled:
            import torch.distributed as dist

            dist.all_reduce(sums)
        pairs = max(float(sums[-1]), 1.0)
        names = METRICS[:4] if self.objective.name == "reward" else METRICS  # a reward model has no log-probs
        return {name: float(sums[i]) / pairs for i, name in enumerate(names)}


# ---- reward models ------------------------------------------------------------------------------------


def add_reward_head(model: nn.Module, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Give ``model`` a trainable scalar head ``score`` (hidden -> 1, no bias), as transformers'
    ``*ForSequenceClassification`` with ``num_labels = 1``. Initialised N(0, 0.02) from the
    current RNG (seeded by the run); ``adapter_dtype``: its dtype next to frozen weights."""
    hidden = model.config.hidden_size
    like = model.model.embed_tokens.weight  # the weights' device and dtype
    dtype = adapter_dtype or like.dtype
    head = nn.Linear(hidden, 1, bias=False, device=like.device, dtype=dtype)
    nn.init.normal_(head.weight, std=0.02)
    head.weight.requires_grad_(True)
    model.score = head
    return model


class RewardLoss(nn.Module):
    """``forward(input_ids, labels, position_ids, reference=None) -> (loss, stats)``: the reward of
    each side is ``score`` applied to its last token's final hidden state; the loss is
    Bradley-Terry's ``-log sigmoid(r_chosen - r_rejected)``, the mean over the pairs."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def rewards(self, input_ids, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        from tunex.train.build import forward_hidden

        hidden = forward_hidden(self.lm, input_ids, position_ids)  # (B, T, H)
        docs = documents(position_ids)
        index = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
        last = [torch.where(docs == d, index, -1).amax(1) for d in (1, 2)]  # (B,) each
        rows = torch.arange(len(hidden), device=hidden.device)
        head = self.lm.score
        return tuple(head(hidden[rows, at].to(head.weight.dtype)).squeeze(-1).float() for at in last)

    def forward(self, input_ids, labels, position_ids, reference=None):
        chosen, rejected = self.rewards(input_ids, position_ids)
        loss = -F.logsigmoid(chosen - rejected).mean()
        c, r = chosen.detach(), rejected.detach()
        zero = torch.zeros((), device=c.device)
        stats = torch.stack(
            [
                c.sum(),
                r.sum(),
                (c > r).float().sum(),
                (c - r).sum(),
                zero,
                zero,
                torch.tensor(float(len(c)), device=c.device),
            ]
        )
        return loss, stats


def loss_module(lm: nn.Module, objective: Objective) -> nn.Module:
    """The module the loop trains through for ``objective``."""
    return RewardLoss(lm) if objective.name == "reward" else PreferenceLoss(lm, objective)
