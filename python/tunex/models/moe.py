"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE.

The llama-family layer of decoder.py with its MLP replaced by a sparse block:

- a router (``gate``: hidden -> experts, no bias) scores every token; the softmax over all experts
  is taken in fp32, the ``num_experts_per_tok`` best are kept and, where the family does
  (Mixtral always, Qwen when ``norm_topk_prob``), renormalised to sum to one;
- each expert is a SwiGLU MLP of its own; a token's output is the routing-weighted sum of its
  experts' outputs;
- Qwen2-MoE adds a shared expert (an MLP every token goes through) scaled by
  ``sigmoid(shared_expert_gate(x))``; Qwen layers listed in ``mlp_only_layers`` (or off the
  ``decoder_sparse_step``) keep a dense MLP.

Experts run grouped through the runtime's ``experts`` hook: in training (Standard runtime) as
one autograd node, tunex.kernels.moe; otherwise :func:`grouped_experts`: the (token, slot) pairs
are sorted by expert, the rows gathered once in that order (``index_select``), each expert takes
its run of them in one product per projection, and the weighted outputs go back to their rows in
one ``index_add_``: one loop over the experts, never over tokens. Every expert projection is a plain
``nn.Linear`` under the checkpoint's own name (Mixtral ``block_sparse_moe.experts.3.w1``, Qwen
``mlp.experts.3.gate_proj``), so checkpoints load without renaming, QLoRA packs the experts like
any linear, and LoRA adapts each expert's projections under the names PEFT gives them. The
routers are :class:`Router` layers: kept dense by QLoRA and left out of ``"all-linear"`` (name
``gate`` / ``shared_expert_gate`` in ``target_modules`` to adapt them).

Training can add the router's load-balancing loss (Switch Transformer's, as transformers computes
it for these families): ``model.router_aux_loss_coef`` > 0 (the trainer sets it from
``train.router_aux_loss_coef``) makes each MoE block record its routing statistics in a training
forward, and :meth:`MoECausalLM.router_aux_loss` returns ``coef * num_experts * sum_e f_e * P_e``
over all MoE layers' tokens (f_e: the fraction of routing slots that chose expert e, P_e: the mean
router probability of e).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tunex import runtime as runtimes
from tunex.kernels import registry
from tunex.models.config import ModelConfig
from tunex.models.decoder import MLP, Attention, CausalLM, DecoderLayer, DecoderModel, RMSNorm


class Router(nn.Linear):
    """A router's linear layer (hidden -> experts or -> 1). QLoRA keeps it dense and ``all-linear``
    LoRA leaves it alone (``router`` marks it); naming it in ``target_modules`` adapts it."""

    router = True


class MixtralExpert(nn.Module):
    """One Mixtral expert: ``w2(silu(w1 x) * w3 x)`` under the checkpoint's names."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def projections(self):
        return self.w1, self.w3, self.w2

    def forward(self, x, rt=None):
        return expert_forward(self, x, rt or runtimes.default())


class QwenExpert(MLP):
    """One Qwen expert (or the shared expert): ``down_proj(silu(gate_proj x) * up_proj x)``."""

    def __init__(self, cfg: ModelConfig, inter: int):
        super().__init__(dataclasses.replace(cfg, intermediate_size=inter, fused_gate_up=False, mlp_bias=False))

    def projections(self):
        return self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x, again=None, rt=None):
        return expert_forward(self, x, rt or runtimes.default())


def expert_forward(expert, x: torch.Tensor, rt) -> torch.Tensor:
    gate, up, down = expert.projections()
    g, u = rt.project((gate, up), x)
    (out,) = rt.project((down,), rt.swiglu(g, u))
    return out


class RouterStats:
    """The routing statistics of one training forward, for the load-balancing loss: per MoE layer,
    the routing slots each expert got (counts, no gradient) and the sum of its router
    probabilities over the tokens (with gradient)."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.on, self.coef = False, 0.0  # recording (training with the loss on) and the loss's weight

    def clear(self) -> None:
        self.layers.clear()

    def add(self, probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> None:
        counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(probs.dtype)
        self.layers.append((counts, probs.sum(dim=0), probs.shape[0]))

    def loss(self, num_experts: int) -> torch.Tensor | None:
        if not self.layers:
            return None
        rows = sum(n for *_, n in self.layers)
        fraction = sum(c for c, _, _ in self.layers) / rows  # routing slots per token, per expert
        prob = sum(p for _, p, _ in self.layers) / rows
        return num_experts * torch.sum(fraction * prob)


class SparseMoE(nn.Module):
    """The router and the experts of one layer (Qwen2-MoE: and the shared expert)."""

    def __init__(self, cfg: ModelConfig, stats: RouterStats):
        super().__init__()
        self.num_experts, self.top_k, self.renorm = cfg.num_experts, cfg.experts_per_tok, cfg.norm_topk_prob
        # Mixtral weights the experts' outputs in fp32 (its routing weights stay fp32), Qwen in the
        # hidden dtype
        self.fp32_weights = cfg.family == "mixtral"
        self.gate = Router(cfg.hidden_size, cfg.num_experts, bias=False)
        inter = cfg.moe_intermediate_size
        if cfg.family == "mixtral":
            self.experts = nn.ModuleList(MixtralExpert(cfg.hidden_size, inter) for _ in range(cfg.num_experts))
        else:
            self.experts = nn.ModuleList(QwenExpert(cfg, inter) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = QwenExpert(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Router(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        object.__setattr__(self, "stats", stats)  # shared by the model's blocks; not a module

    def route(self, x: torch.Tensor, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k), expert ids (N, k)) for the rows of ``x`` (N, C)."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if record:
            self.stats.add(probs, chosen, self.num_experts)
        return (weights if self.fp32_weights else weights.to(x.dtype)), chosen

    def forward(self, x: torch.Tensor, again=None, rt=None) -> torch.Tensor:
        """``again``: a lean rebuild of x (see MoELayer) for the experts' node, which then does not
        keep x."""
        rt = rt or runtimes.default()
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        record = self.stats.on and self.training and torch.is_grad_enabled()
        weights, chosen = self.route(flat, record)
        out = rt.experts(self.experts, flat, weights, chosen, grouped_experts, again)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat, rt=rt)
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * shared
        return out.view(shape)


def grouped_experts(experts, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, rt) -> torch.Tensor:
    """sum over each row's k slots of ``weight * expert(row)``, expert by expert.

    The N*k (row, slot) pairs are sorted by expert (stable, so each expert's rows stay in order);
    the rows are gathered once in that order, each expert with any rows runs once on its run of
    them, and the weighted outputs go back to their rows in one ``index_add_``. The experts'
    products run under ``registry.varying_shapes`` (torch's matmul, not oneDNN, as in the grouped
    node; a one-row product still takes the GEMV).
    """
    k = chosen.shape[1]
    flat_ids = chosen.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    rows = order // k  # the row of each sorted pair
    counts = torch.bincount(flat_ids, minlength=len(experts)).tolist()
    parts = x.index_select(0, rows).split(counts)
    with registry.varying_shapes():  # each expert's rows: a new count each call, kept off oneDNN
        ys = torch.cat([experts[e](part, rt=rt) for e, part in enumerate(parts) if counts[e]])
    ys = ys * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, rows, ys.to(x.dtype))


class MoELayer(DecoderLayer):
    """Attention as in decoder.py, then the sparse block (or, on Qwen's dense layers, an MLP)."""

    def __init__(self, cfg: ModelConfig, layer: int, stats: RouterStats):
        nn.Module.__init__(self)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sparse = bool(cfg.sparse_layers[layer])
        block = SparseMoE(cfg, stats) if self.sparse else MLP(cfg)
        self.ffn_name = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
        setattr(self, self.ffn_name, block)
        self.qkv_uses = 1 if cfg.fused_qkv else 3
        self.gate_up_uses = 2

    def forward(self, x, cos, sin, mask, cache, lean: bool = False, rt=None):
        rt = rt or runtimes.default()
        again = self._renorm(rt, self.input_layernorm, x, self.qkv_uses) if lean else None
        x = rt.add(x, self.self_attn(self.input_layernorm(x, rt), cos, sin, mask, cache, again=again, rt=rt))
        block = getattr(self, self.ffn_name)
        h = self.post_attention_layernorm(x, rt)
        # the normed rows are rebuilt in backward instead of kept: a sparse block's experts node
        # rebuilds them once for all its adapters (nothing else keeps them without a router
        # adapter), a dense MLP once for each of gate and up
        uses = 1 if self.sparse else self.gate_up_uses
        again = self._renorm(rt, self.post_attention_layernorm, x, uses) if lean else None
        return rt.add(x, block(h, again=again, rt=rt))


class MoEModel(DecoderModel):
    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.router_stats = RouterStats()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoELayer(cfg, i, self.router_stats) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.offload_checkpoints = False
        self.runtime = None

    def forward(self, input_ids, position_ids=None, cache=None):
        self.router_stats.clear()  # a new forward: the last one's statistics are spent
        return super().forward(input_ids, position_ids, cache)


class MoECausalLM(CausalLM):
    """A mixture-of-experts decoder with its head."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.model = MoEModel(cfg)
        self._tie_or_make_head(cfg)

    @property
    def router_aux_loss_coef(self) -> float:
        """The load-balancing loss's weight in training (0: off, the routers' statistics are not kept)."""
        return self.model.router_stats.coef if self.model.router_stats.on else 0.0

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, coef: float) -> None:
        self.model.router_stats.on = coef > 0
        self.model.router_stats.coef = float(coef)

    def router_aux_loss(self) -> torch.Tensor | None:
        """``coef`` times the load-balancing loss of the last training forward; None when off."""
        stats = self.model.router_stats
        if not stats.on:
            return None
        loss = stats.loss(self.config.num_experts)
        stats.clear()  # its tensors are now in the loss's graph only
        return None if loss is None else stats.coef * loss
