"""Which linear layers get an adapter, and swapping them for LoRA layers.

``target_modules`` follows PEFT: a list of names matches a module whose full name equals an entry
or ends with ``.<entry>``; a string other than ``"all-linear"`` is a regex that must match the whole
module name; ``"all-linear"`` is every linear layer except the output head (and the routers of MoE models).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from tunex.errors import ConfigError
from tunex.peft.lora import LoRALinear

OUTPUT_HEAD_NAMES = ("lm_head", "output")


def is_linear(module: nn.Module) -> bool:
    """A dense ``nn.Linear`` or a quantized linear base layer (anything with ``dequantize`` and the
    ``in_features``/``out_features`` of a linear)."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantize"))


def _is_output_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    if name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES:
        return True
    get_head = getattr(model, "get_output_embeddings", None)
    return callable(get_head) and get_head() is module


def select(names: list[str], target: str | list[str]) -> list[bool]:
    """Whether each module name is selected by ``target`` (a list of suffixes or a full-match regex).

    PEFT's rule, resolved in Rust (``_native.peft_targets``, the merge's regex engine); a bad regex
    raises ValueError naming it.
    """
    from tunex import _native

    return _native.peft_targets(target if isinstance(target, str) else list(target), list(names))


def matches(name: str, target: str | list[str]) -> bool:
    """Whether module ``name`` is selected by ``target`` (a list of suffixes or a full-match regex)."""
    return select([name], target)[0]


def select_targets(model: nn.Module, target: str | list[str]) -> list[str]:
    """Names of the linear layers ``target`` selects, in module order.

    Raises:
        ConfigError: when nothing is selected, listing the linear layer names there are.
    """
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(m)]
    if target == "all-linear":
        # the head and the MoE routers (tunex.models.moe.Router) are left alone, as PEFT leaves them
        chosen = [n for n, m in linears if not _is_output_head(n, m, model) and not getattr(m, "router", False)]
    else:
        chosen = [n for (n, _), hit in zip(linears, select([n for n, _ in linears], target)) if hit]
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ConfigError(
            "method.target_modules",
            [
                f"{target!r} selects no linear layer of the model; its linear layers end in: "
                f"{', '.join(suffixes) or '(none)'}; use 'all-linear' or some of those names"
            ],
        )
    return chosen


def apply_lora(
    model: nn.Module,
    target: str | list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> list[str]:
    """Freeze ``model`` and replace each selected linear with a ``LoRALinear`` in place.

    Returns the adapted module names; afterwards only adapter tensors require grad.
    """
    names = select_targets(model, target)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, r, alpha, dropout, use_rslora, use_dora))
    return names


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def trainable_state_dict(model: nn.Module) -> dict:
    """The tensors that require grad, by their model names (detached, same storage)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
