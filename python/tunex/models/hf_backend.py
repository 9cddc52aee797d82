"""The transformers backend: architectures tunex's own decoder does not define, run through
transformers' ``AutoModelForCausalLM`` (an optional dependency: ``pip install tunex[hf]``).

``model.backend`` chooses: ``"tunex"`` (tunex's decoder only), ``"transformers"`` (always
transformers) or ``"auto"`` (the default: tunex's decoder for the families it defines, see
``tunex.models.config.FAMILIES``, transformers for any other ``model_type`` it knows). Everything
else stays tunex's: the data pipeline, the loop, LoRA / DoRA / QLoRA layers put in place of the
target linears (NF4 packing included), checkpoints, ``pth_to_hf``, ``convert merge`` and chat.

:class:`HFCausalLM` presents a transformers model the way tunex's trainer and generation call a
model: its top-level modules are the wrapper's own, so module and parameter names (LoRA targets,
adapter keys as PEFT writes them for that model) are transformers'; ``hidden_states`` runs the
base model (packed rows: transformers builds the per-document mask from position ids that
restart), ``lm_head`` is the output embedding, and ``new_cache`` / ``model(ids, cache=...)`` decode
with transformers' own KV cache. Loading checks once that the logits are the head applied to the
final hidden states (models that rescale or soft-cap their logits are refused, since the
trainer's loss applies the head itself).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunex.errors import FormatError
from tunex.models.config import FAMILIES, read_config, read_config_json

BACKENDS = ("auto", "tunex", "transformers")
INSTALL = "pip install 'tunex[hf]'"


@dataclass
class HFConfig:
    """What tunex reads of a transformers model's config (the rest stays in ``raw``)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_id: int | list[int] | None
    torch_dtype: str | None = None
    num_experts: int = 0
    backend: str = "transformers"
    folder: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _knows(transformers, model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def choose_backend(folder, backend: str = "auto") -> str:
    """ "tunex" or "transformers" for the model in ``folder`` under ``model.backend = backend``.

    Raises:
        FormatError: the architecture is neither tunex's nor one transformers (installed) can
            train as a causal LM; the message names it, lists tunex's and says how to get the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"model.backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    path, raw = read_config_json(folder)
    model_type = raw.get("model_type")
    if backend == "tunex" or (backend == "auto" and model_type in FAMILIES):
        return "tunex"
    transformers = _transformers()
    native = ", ".join(FAMILIES)
    if transformers is None:
        raise FormatError(
            f"{path}: model_type {model_type!r} is not supported by tunex's own decoder ({native}); other "
            f"architectures train through the transformers backend, which needs transformers: {INSTALL}"
        )
    if not isinstance(model_type, str) or not _knows(transformers, model_type):
        raise FormatError(
            f"{path}: model_type {model_type!r} is not supported: it is neither one of tunex's own ({native}) nor "
            f"a causal LM transformers {transformers.__version__} knows; upgrade transformers ({INSTALL} -U) "
            "or convert the model"
        )
    return "transformers"


def model_config(folder, backend: str = "auto"):
    """The model config tunex works with: its own :class:`ModelConfig` for its families, else an
    :class:`HFConfig` read through transformers' ``AutoConfig``."""
    folder = Path(folder)
    if choose_backend(folder, backend) == "tunex":
        return read_config(folder)
    return _hf_config(folder)


def _hf_config(folder: Path) -> HFConfig:
    from transformers import AutoConfig

    _, raw = read_config_json(folder)
    hf = AutoConfig.from_pretrained(folder)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return HFConfig(
        family=str(hf.model_type),
        vocab_size=int(text.vocab_size),
        hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 0) or 0),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        eos_token_id=getattr(text, "eos_token_id", None),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        folder=str(folder),
        raw=raw,
    )


class HFCache:
    """A generation's transformers KV cache (made by the model's first call) and its length."""

    def __init__(self):
        self.past = None
        self.length = 0


class HFCausalLM(nn.Module):
    """A transformers causal LM called the way tunex calls its own models (see the module docstring)."""

    logit_softcap = None

    def __init__(self, hf: nn.Module, cfg: HFConfig):
        super().__init__()
        object.__setattr__(self, "hf", hf)  # not a child: its children are ours, under their own names
        self.config = cfg
        for name, child in hf.named_children():
            self.add_module(name, child)
        head = hf.get_output_embeddings()
        if "lm_head" not in self._modules:
            object.__setattr__(self, "lm_head", head)  # the trainer's name for the head

    def get_output_embeddings(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def train(self, mode: bool = True):
        self.hf.train(mode)
        return super().train(mode)

    def hidden_states(self, input_ids, position_ids=None, cache=None) -> torch.Tensor:
        out = self.hf.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids, position_ids=None, cache: HFCache | None = None, last_only: bool = False):
        if cache is None:
            logits = self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        else:  # transformers 5 calls the cache argument and output `cache`, earlier ones `past_key_values`
            name = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
            out = self.hf(input_ids=input_ids, use_cache=True, **{name: cache.past})
            cache.past, cache.length = getattr(out, name), cache.length + input_ids.shape[1]
            logits = out.logits
        return logits[:, -1:] if last_only else logits

    def new_cache(self, batch: int, max_len: int) -> HFCache:
        return HFCache()

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.hf, _checkpointing_name(self.hf, "is_gradient_checkpointing"), False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        hf = self.hf
        if on:  # the checkpointing kwargs come first under either name
            getattr(hf, _checkpointing_name(hf, "gradient_checkpointing_enable"))({"use_reentrant": False})
        else:
            getattr(hf, _checkpointing_name(hf, "gradient_checkpointing_disable"))()


def _checkpointing_name(hf: nn.Module, name: str) -> str:
    """``name`` as the model's transformers spells it: transformers 5 renamed gradient checkpointing
    to activation checkpointing (the old names warn and go in v6); releases before keep the old."""
    renamed = name.replace("gradient", "activation")
    return renamed if hasattr(type(hf), renamed) else name


def _head_check(model: HFCausalLM, folder: Path) -> None:
    """Refuse a model whose logits are not its head applied to its final hidden states."""
    ids = torch.tensor([[0, 1, 2]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).float()
        head = model.get_output_embeddings()
        hidden = model.hidden_states(ids)
        mine = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None)).float()
    if not torch.allclose(logits, mine, rtol=1e-3, atol=1e-3 * max(1.0, float(logits.abs().max()))):
        raise FormatError(
            f"{folder}: this {model.config.family} model's logits are not its output head applied to its final "
            "hidden states (it rescales or caps them), which tunex's loss assumes; it cannot train here"
        )


def load_hf_model(folder, *, dtype, device, quantize=None) -> HFCausalLM:
    """A transformers model from ``folder`` in ``dtype`` on ``device``, frozen, in eval mode;
    ``quantize(name, linear)`` replaces each linear but the head (QLoRA)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    cfg = _hf_config(folder)
    with _quiet():
        hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    # transformers fills weights the checkpoint lacks with random values and only warns: refuse that
    missing = sorted(info.get("missing_keys") or ()) + sorted(str(k[0]) for k in info.get("mismatched_keys") or ())
    if missing or info.get("unexpected_keys"):
        problems = [f"missing {len(missing)} tensors, e.g. {', '.join(missing[:4])}"] if missing else []
        unexpected = sorted(info.get("unexpected_keys") or ())
        if unexpected:
            problems.append(f"{len(unexpected)} tensors the config does not use, e.g. {', '.join(unexpected[:4])}")
        raise FormatError(
            f"{folder}: checkpoint does not match config.json ({cfg.family}, through transformers): "
            + "; ".join(problems)
        )
    hf = hf.to(device)
    hf.requires_grad_(False)
    model = HFCausalLM(hf, cfg).eval()
    _head_check(model, folder)
    if quantize is not None:
        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and module is not head:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, attr, quantize(name, module))
    return model


@contextlib.contextmanager
def _quiet():
    """transformers' loading progress bar off (tunex's commands print their own lines)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def meta_hf_model(cfg: HFConfig) -> HFCausalLM:
    """The model of ``cfg`` on the meta device (module names and shapes, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.folder))
    return HFCausalLM(hf, cfg)
