"""The TOML config schema of ``tunex train`` and its validator.

A config has nine sections: ``[model]``, ``[data]``, ``[method]``, ``[train]``, ``[eval]``,
``[save]``, ``[log]``, ``[vision]`` (multimodal runs only) and ``[preference]`` (read only by the
preference objectives). Each section is a dataclass below; a field's metadata carries its check and
its doc line, so the schema, the defaults and the validation live in one place. Defaults follow XTuner's QLoRA
recipes (r=64, alpha=16, dropout 0.1, lr 2e-4, cosine with 3% warmup, batch 1 x accumulation 16,
max_length 2048, packing on).

Loading reports every problem at once, each naming its key path, what was expected and, for a
misspelled key, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunex.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

REQUIRED: Any = object()


class _Bad(Exception):
    """A check's complaint: what was expected."""


Check = Callable[[Any], Any]


def _setting(default: Any, check: Check, doc: str) -> Any:
    if default is REQUIRED:
        return field(default=None, metadata={"check": check, "doc": doc, "required": True})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


# ---- checks: each returns the normalised value or raises _Bad("expected ...") -------------------


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("a string")
    return v


def _nonempty_text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("a non-empty string")
    return v


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str:
        if v not in choices:
            raise _Bad("one of " + ", ".join(repr(c) for c in choices))
        return v

    return check


def _integer(lo: int, hi: int | None = None) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise _Bad(f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return v

    return check


def _number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok:
            ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            left = f"> {lo}" if lo_open else f">= {lo}"
            right = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
            raise _Bad(f"a number {left}{right}")
        return float(v)

    return check


def _power_of_two(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or v > hi or v & (v - 1):
            raise _Bad(f"a power of two from {lo} to {hi}")
        return v

    return check


def _text_or_list(v: Any) -> str | list[str]:
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v):
        return list(v)
    raise _Bad("a non-empty string or a non-empty list of strings")


def _text_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Bad("a list of strings")
    return list(v)


def _optional_paths(v: Any) -> str | list[str]:
    if v == "" or v == []:
        return ""
    return _text_or_list(v)


def _backends(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(x in TRACKERS for x in v) or len(set(v)) != len(v):
        raise _Bad("a list of distinct names from " + ", ".join(repr(t) for t in TRACKERS))
    return list(v)


def _betas(v: Any) -> list[float]:
    if (
        not isinstance(v, list)
        or len(v) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in v)
    ):
        raise _Bad("two numbers in [0, 1), e.g. [0.9, 0.999]")
    return [float(x) for x in v]


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# model.rope_scaling: the kinds, the keys each requires and the keys each may set (as config.json's rope_scaling)
ROPE_SCALING_KINDS = ("linear", "dynamic", "yarn", "longrope", "llama3")
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("long_factor", "short_factor"),
}
_ROPE_OPTIONAL = {
    "linear": (),
    "dynamic": (),
    "yarn": (
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "llama3": ("original_max_position_embeddings",),
    "longrope": ("original_max_position_embeddings", "factor", "attention_factor"),
}


def _rope_scaling(v: Any) -> dict:
    """A rope_scaling table as config.json spells it (``type`` or ``rope_type``, and the kind's
    keys), normalised to ``rope_type``; empty: the checkpoint's own."""
    if not isinstance(v, dict):
        raise _Bad('a table such as {type = "yarn", factor = 4.0}, or {} for the checkpoint\'s own')
    if not v:
        return {}
    if "type" in v and "rope_type" in v and v["type"] != v["rope_type"]:
        raise _Bad("one of 'type' and 'rope_type', not two different kinds")
    kind = v.get("rope_type", v.get("type"))
    if kind not in ROPE_SCALING_KINDS:
        raise _Bad(f"a 'type' of {', '.join(map(repr, ROPE_SCALING_KINDS))} (got type {kind!r})")
    allowed = {"type", "rope_type", *_ROPE_REQUIRED[kind], *_ROPE_OPTIONAL[kind]}
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise _Bad(f"only the keys {', '.join(sorted(allowed))} for type {kind!r} (unknown: {', '.join(unknown)})")
    missing = [k for k in _ROPE_REQUIRED[kind] if k not in v]
    if missing:
        raise _Bad(f"the keys {', '.join(_ROPE_REQUIRED[kind])} for type {kind!r} (missing: {', '.join(missing)})")
    out: dict[str, Any] = {"rope_type": kind}
    for key, value in v.items():
        if key in ("type", "rope_type"):
            continue
        if key in ("long_factor", "short_factor"):
            if not isinstance(value, list) or not value or not all(_positive_number(x) for x in value):
                raise _Bad(f"{key} as a non-empty list of positive numbers (one per rotary frequency)")
            out[key] = [float(x) for x in value]
        elif key == "truncate":
            if not isinstance(value, bool):
                raise _Bad("truncate as true or false")
            out[key] = value
        elif key == "original_max_position_embeddings":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _Bad("original_max_position_embeddings as an integer >= 1 (the trained context length)")
            out[key] = value
        else:
            if not _positive_number(value):
                raise _Bad(f"{key} as a positive number")
            out[key] = float(value)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise _Bad("high_freq_factor > low_freq_factor")
    if kind != "longrope" and out["factor"] < 1.0:
        raise _Bad(f"factor >= 1 (how many times the trained context; got {out['factor']})")
    return out


DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
DATA_FORMATS = (
    "alpaca",
    "openai",
    "sharegpt",
    "pretrain",
    "conversation",
    "chatterbot",
    "llava",
    "preference",
    "chatterbot_pairs",
)
PREFERENCE_FORMATS = ("preference", "chatterbot_pairs")  # records of (prompt, chosen, rejected)
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "reward")
TRACKERS = ("tensorboard", "wandb", "mlflow")
BEST_METRICS = ("", "eval_loss", "eval_perplexity", "eval_rewards/accuracies", "eval_rewards/margins")
PREFERENCE_BEST = ("eval_rewards/accuracies", "eval_rewards/margins")  # preference objectives' figures
XTUNER_EVAL_PROMPTS = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]


# ---- the schema -----------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    path: str = _setting(REQUIRED, _nonempty_text, "HF model folder, GGUF file, or a downloaded hub snapshot")
    dtype: str = _setting("auto", _one_of(*DTYPES), "weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    tokenizer: str = _setting("", _text, "tokenizer folder; empty = the model's own")
    rope_scaling: dict = _setting(
        {},
        _rope_scaling,
        "RoPE scaling to train beyond the native length, replacing the checkpoint's: a table as config.json's "
        'rope_scaling, type linear / dynamic / yarn / longrope / llama3, e.g. {type = "yarn", factor = 4.0}; '
        "{} = the checkpoint's own (docs/TRAINING.md)",
    )
    backend: str = _setting(
        "auto",
        _one_of("auto", "tunex", "transformers"),
        "auto = tunex's decoder for its families, transformers (pip install 'tunex[hf]') for other architectures",
    )


@dataclass
class DataConfig:
    path: str | list[str] = _setting(REQUIRED, _text_or_list, "data file(s) or folder(s)")
    format: str = _setting("alpaca", _one_of(*DATA_FORMATS), "record format of the data files")
    template: str = _setting("auto", _nonempty_text, "chat template: auto = the model's own, or a built-in name")
    system: str = _setting("", _text, "system prompt put before every conversation")
    max_length: int = _setting(2048, _integer(16), "tokens per sample (and per packed sequence)")
    pack_to_max_length: bool = _setting(True, _flag, "concatenate samples into max_length sequences")
    shuffle_before_pack: bool = _setting(True, _flag, "shuffle samples before packing")
    num_workers: int = _setting(0, _integer(0, 256), "tokenizer worker processes; 0 = in process")
    cache_dir: str = _setting("", _text, "tokenized-data cache; empty = <work_dir>/../.cache")
    image_folder: str = _setting(
        "", _text, "[vision] runs: folder image paths are relative to; empty = the data file's"
    )
    skip_bad_images: bool = _setting(
        False, _flag, "[vision] runs: skip (and count) records whose image is missing or undecodable instead of failing"
    )


@dataclass
class MethodConfig:
    kind: str = _setting("qlora", _one_of("full", "lora", "qlora"), "full fine-tune, LoRA or QLoRA")
    r: int = _setting(64, _integer(1, 4096), "LoRA rank")
    alpha: float = _setting(16.0, _number(0, lo_open=True), "LoRA alpha; scaling = alpha / r")
    dropout: float = _setting(0.1, _number(0, 1, hi_open=True), "dropout on the LoRA input")
    target_modules: str | list[str] = _setting(
        "all-linear",
        _text_or_list,
        "'all-linear', a list of module-name suffixes, or a regex matching whole names (Rust syntax)",
    )
    use_rslora: bool = _setting(False, _flag, "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = _setting(False, _flag, "weight-decomposed LoRA (magnitude vectors)")
    quant_type: str = _setting("nf4", _one_of("nf4", "fp4"), "4-bit code of the QLoRA base")
    blocksize: int = _setting(64, _power_of_two(32, 4096), "elements per absmax block")
    double_quant: bool = _setting(True, _flag, "quantize the absmax statistics too (~0.37 bit/param saved)")
    compute_dtype: str = _setting("auto", _one_of(*DTYPES), "dtype of the dequantized matmul")


@dataclass
class TrainConfig:
    batch_size: int = _setting(1, _integer(1), "sequences per device per step")
    grad_accum: int = _setting(16, _integer(1), "micro-batches accumulated per optimizer step")
    epochs: int = _setting(3, _integer(1), "passes over the data (unless max_steps is set)")
    max_steps: int = _setting(0, _integer(0), "optimizer steps; 0 = derived from epochs")
    lr: float = _setting(2e-4, _number(0, lo_open=True), "peak learning rate")
    betas: list[float] = _setting([0.9, 0.999], _betas, "AdamW betas")
    weight_decay: float = _setting(0.0, _number(0), "AdamW weight decay")
    max_norm: float = _setting(1.0, _number(0), "gradient clipping norm; 0 = off")
    warmup_ratio: float = _setting(0.03, _number(0, 1, hi_open=True), "fraction of steps in linear warmup")
    scheduler: str = _setting("cosine", _one_of("cosine", "linear", "constant"), "lr schedule after warmup")
    seed: int = _setting(0, _integer(0), "random seed")
    dtype: str = _setting(
        "auto",
        _one_of(*DTYPES),
        "training precision; auto = bf16 on CUDA, fp32 on CPU; "
        "bfloat16 on the CPU = bf16 products with frozen weights, fp32 elsewhere",
    )
    gradient_checkpointing: bool = _setting(True, _flag, "recompute activations in backward")
    adapter_dtype: str = _setting(
        "float32",
        _one_of("float32", "bfloat16"),
        "LoRA/QLoRA adapter weights and gradients; bfloat16 halves them, AdamW keeps float32 moments "
        "and rounds the weight stochastically",
    )
    optimizer: str = _setting(
        "adamw",
        _one_of(*OPTIMIZERS),
        "adamw: float32 moments (8 bytes per trainable parameter); adamw_8bit: 8-bit blockwise moments "
        "(2 bytes + one float32 absmax per 256); paged_adamw_8bit: the 8-bit moments in host memory, "
        "copied to the GPU one parameter at a time",
    )
    offload_checkpoints: bool = _setting(
        False,
        _flag,
        "with gradient checkpointing, keep each layer's checkpointed input in (pinned) CPU memory until backward",
    )
    sequence_parallel: int = _setting(
        1,
        _integer(1),
        "ranks that share each sequence (Ulysses: all-to-all over heads around attention); "
        "world size = data-parallel x this; 1 = off (docs/SCALING.md)",
    )
    fsdp: bool = _setting(
        False,
        _flag,
        "LoRA/QLoRA on several processes: shard the frozen base (QLoRA: its NF4 codes and absmax), the "
        "adapters and their optimizer state with FSDP2 instead of a DDP replica per process, for a base "
        "too large for one device (a full fine-tune is always sharded); docs/SCALING.md",
    )
    router_aux_loss_coef: float = _setting(
        0.0,
        _number(0),
        "MoE models: weight of the routers' load-balancing loss added to the loss; 0 = off",
    )
    log_steps: int = _setting(10, _integer(1), "log every N optimizer steps")
    objective: str = _setting(
        "sft",
        _one_of(*OBJECTIVES),
        "sft: next-token loss on the targets; dpo, ipo, orpo, simpo: preference objectives on "
        "(chosen, rejected) pairs, set in [preference]; reward: a reward model (a scalar head on the "
        "last token, Bradley-Terry loss) on the same pairs (docs/PREFERENCE.md)",
    )


def _auto_or_flag(v: Any) -> str | bool:
    if v == "auto" or isinstance(v, bool):
        return v
    raise _Bad("'auto', true or false")


@dataclass
class PreferenceConfig:
    beta: float = _setting(
        0.1, _number(0, lo_open=True), "temperature of the preference loss (IPO: the regulariser tau; ORPO: lambda)"
    )
    label_smoothing: float = _setting(
        0.0, _number(0, 0.5, hi_open=True), "dpo, simpo: probability that a pair's label is flipped (conservative DPO)"
    )
    gamma: float = _setting(0.5, _number(0), "simpo: target reward margin gamma (the loss uses gamma / beta)")
    reference: str = _setting(
        "auto",
        _one_of("auto", "model", "none"),
        "model: log-ratios against the frozen starting model (LoRA/QLoRA: adapters off; full: computed "
        "once and cached beside the token cache); none: reference-free; auto = model for dpo and ipo, "
        "none for orpo and simpo",
    )
    length_normalize: str | bool = _setting(
        "auto",
        _auto_or_flag,
        "use the mean instead of the sum of a response's token log-probs; auto = true for ipo, orpo and "
        "simpo, false for dpo",
    )

    def uses_reference(self, objective: str) -> bool:
        return self.reference == "model" or (self.reference == "auto" and objective in ("dpo", "ipo"))

    def normalizes(self, objective: str) -> bool:
        if self.length_normalize == "auto":
            return objective in ("ipo", "orpo", "simpo")
        return bool(self.length_normalize)


@dataclass
class EvalConfig:
    prompts: list[str] = _setting(XTUNER_EVAL_PROMPTS, _text_list, "prompts answered by the eval hook")
    every_n_steps: int = _setting(
        500, _integer(0), "answer the prompts and measure the held-out loss every N steps; 0 = only at the end"
    )
    max_new_tokens: int = _setting(128, _integer(1), "tokens generated per eval prompt")
    system: str = _setting("", _text, "system prompt for eval prompts")
    data: str | list[str] = _setting(
        "",
        _optional_paths,
        "held-out data file(s) or folder(s) for eval_loss / eval_perplexity (preference objectives: held-out "
        "pairs for eval_loss and TRL's eval_rewards/accuracies, ...); empty = none",
    )
    format: str = _setting("", _one_of("", *DATA_FORMATS), "record format of eval.data; empty = data.format")
    split: float = _setting(
        0.0,
        _number(0, 1, hi_open=True),
        "fraction of the training records held out for evaluation (the same records whatever the seed); "
        "0 = none; not with eval.data",
    )
    batch_size: int = _setting(0, _integer(0), "sequences per held-out forward; 0 = train.batch_size")
    at_start: bool = _setting(
        False,
        _flag,
        "also evaluate before the first step (logged as step 0): the starting model's held-out loss and "
        "answers, a baseline for the run's; not when resuming",
    )


@dataclass
class SaveConfig:
    work_dir: str = _setting("", _text, "output folder; empty = work_dirs/<config name>")
    save_steps: int = _setting(500, _integer(1), "write iter_N.pth every N steps")
    save_total_limit: int = _setting(2, _integer(0), "checkpoints kept; 0 = keep all")
    best_metric: str = _setting(
        "",
        _one_of(*BEST_METRICS),
        "eval_loss or eval_perplexity (lowest), or for preference objectives eval_loss, "
        "eval_rewards/accuracies or eval_rewards/margins (highest): keep the checkpoint of the best held-out "
        "evaluation as best.pth (never pruned); empty = off",
    )


@dataclass
class LogConfig:
    backends: list[str] = _setting(
        [],
        _backends,
        "trackers: tensorboard, wandb, mlflow (each needs its package); TensorBoard files are also "
        "written whenever the tensorboard package is installed",
    )
    project: str = _setting("", _text, "wandb project / MLflow experiment; empty = tunex")
    run_name: str = _setting("", _text, "run name in the trackers; empty = the work dir's name")
    tracking_uri: str = _setting(
        "",
        _text,
        "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else sqlite:///<work dir's parent>/mlflow.db",
    )


@dataclass
class VisionConfig:
    path: str = _setting("", _text, "vision tower: an HF CLIP / SigLIP folder; empty = a text-only run")
    select_layer: int = _setting(
        -2, _integer(-1000, 1000), "tower layer whose patch features the LLM sees (-2: LLaVA's)"
    )
    projector: str = _setting("mlp2x_gelu", _one_of("mlp2x_gelu", "linear"), "projector: LLaVA-1.5's MLP or one linear")
    image_aspect: str = _setting(
        "pad",
        _one_of("pad", "resize"),
        "pad: to a square with the mean colour first (LLaVA-1.5); resize: crop as the tower",
    )
    stage: str = _setting(
        "finetune",
        _one_of("pretrain", "finetune"),
        "pretrain: only the projector trains (LLM and tower frozen); finetune: the projector and the LLM as [method] says",
    )
    projector_checkpoint: str = _setting(
        "", _text, "finetune: the pretrain stage's iter_N.pth (or its work dir) whose projector this run starts from"
    )
    tower_lora: bool = _setting(False, _flag, "finetune: LoRA (method.dropout) on the tower's linear layers")
    tower_lora_r: int = _setting(0, _integer(0, 4096), "the tower's LoRA rank; 0 = method.r")
    tower_lora_alpha: float = _setting(0.0, _number(0), "the tower's LoRA alpha; 0 = method.alpha")


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        """The config as TOML text that loads back to an equal config."""
        lines: list[str] = []
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source != "<dict>" else "config"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "save": SaveConfig,
    "log": LogConfig,
    "vision": VisionConfig,
    "preference": PreferenceConfig,
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def describe() -> str:
    """Markdown reference of every section and key (docs/CONFIG.md is generated from this)."""
    out = [
        "# Config reference",
        "",
        "Generated from `tunex/config.py` by `python -m tunex.config > docs/CONFIG.md`.",
        "",
    ]
    for name, cls in SECTIONS.items():
        out += [f"## [{name}]", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.metadata.get("required"):
                default = "**required**"
            else:
                value = f.default_factory() if f.default is dataclasses.MISSING else f.default
                default = f"`{_toml_value(value)}`"
            out.append(f"| `{f.name}` | {default} | {f.metadata['doc']} |")
        out.append("")
    return "\n".join(out)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{name}: expected a table [{name}], got {type(raw).__name__}")
        raw = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key{_did_you_mean(key, fields)} (valid keys: {', '.join(fields)})")
            continue
        try:
            values[key] = fields[key].metadata["check"](value)
        except _Bad as bad:
            problems.append(f"{name}.{key}: expected {bad}, got {value!r}")
    for key, f in fields.items():
        if f.metadata.get("required") and key not in raw:
            problems.append(f"{name}.{key}: required key is missing ({f.metadata['doc']})")
    return cls(**values)


def _check_vision(cfg: Config, problems: list[str]) -> None:
    v = cfg.vision
    if not v.path:
        for key, fmt in (("data.format", cfg.data.format), ("eval.format", cfg.eval.format)):
            if fmt == "llava":
                problems.append(f"{key}: 'llava' needs a vision tower: set vision.path")
        return
    if cfg.data.format not in ("llava", "openai"):
        problems.append(f"data.format: expected 'llava' or 'openai' with vision.path set, got {cfg.data.format!r}")
    if cfg.train.sequence_parallel > 1:
        problems.append(
            "train.sequence_parallel: expected 1 for [vision] runs (vision.path is set): a sequence's image "
            "features are not split across ranks; use data parallelism (--nproc-per-node) instead"
        )
    if cfg.eval.format not in ("", "llava", "openai"):
        problems.append(
            f"eval.format: expected 'llava', 'openai' or empty (data.format) with vision.path set, got {cfg.eval.format!r}"
        )
    if v.stage == "pretrain" and (v.tower_lora or v.projector_checkpoint):
        problems.append(
            "vision.stage: the pretrain stage trains the projector alone; tower_lora and projector_checkpoint "
            "belong to the finetune stage"
        )


def _check_across(cfg: Config, problems: list[str]) -> None:
    sp = cfg.train.sequence_parallel
    if sp > 1 and cfg.data.max_length % sp:
        problems.append(
            f"data.max_length: expected a multiple of train.sequence_parallel = {sp} (each rank takes "
            f"max_length / {sp} tokens), got {cfg.data.max_length}"
        )
    if sp > 1 and cfg.train.router_aux_loss_coef:
        problems.append(
            f"train.router_aux_loss_coef: expected 0 with train.sequence_parallel = {sp} (the routers' "
            "load-balancing loss is not computed over a sequence split across ranks); set it to 0 or "
            "train.sequence_parallel = 1"
        )
    _check_vision(cfg, problems)
    _check_fsdp(cfg, problems)
    if cfg.train.offload_checkpoints and not cfg.train.gradient_checkpointing:
        problems.append(
            "train.offload_checkpoints: expected false when train.gradient_checkpointing is false "
            "(only checkpoints are offloaded); turn gradient checkpointing on or offloading off"
        )
    if cfg.method.kind == "qlora" and cfg.train.dtype == "float16" and cfg.method.compute_dtype == "bfloat16":
        problems.append("method.compute_dtype: expected float16 or auto when train.dtype is float16, got 'bfloat16'")
    if isinstance(cfg.method.target_modules, str) and cfg.method.target_modules != "all-linear":
        from tunex.peft.targets import select

        try:
            select([], cfg.method.target_modules)  # compiled by the regex engine that applies it
        except ValueError as e:
            problems.append(
                f"method.target_modules: expected 'all-linear', a list or a valid regex, got "
                f"{cfg.method.target_modules!r} ({e})"
            )


def _check_fsdp(cfg: Config, problems: list[str]) -> None:
    """What adapter runs sharded by FSDP2 (``train.fsdp``) do not combine with yet."""
    t = cfg.train
    if not t.fsdp or cfg.method.kind == "full":
        return
    if t.optimizer != "adamw":
        problems.append(
            f"train.optimizer: {t.optimizer!r} steps plain tensors, not the FSDP2 shards of train.fsdp = true; "
            "use 'adamw' or set train.fsdp = false"
        )
    if t.sequence_parallel > 1:
        problems.append(
            "train.sequence_parallel: expected 1 with train.fsdp = true (not combined yet); set one of them off"
        )
    if t.objective != "sft":
        problems.append(
            f"train.objective: {t.objective!r} with train.fsdp = true is not supported yet; use DDP (train.fsdp = false)"
        )
    if cfg.vision.path:
        problems.append("train.fsdp: expected false for [vision] runs (vision.path is set); set train.fsdp = false")


def _check_eval(cfg: Config, problems: list[str]) -> None:
    if cfg.eval.data and cfg.eval.split:
        problems.append("eval.split: expected 0 when eval.data is set (held-out data comes from one of them)")
    if cfg.save.best_metric and not (cfg.eval.data or cfg.eval.split):
        problems.append(
            f"save.best_metric: {cfg.save.best_metric!r} needs a held-out evaluation; set eval.data or eval.split"
        )
    from tunex.track import missing_packages

    for backend, install in missing_packages(cfg.log.backends):
        problems.append(f"log.backends: {backend!r} needs the {backend} package; install it with {install}")


def _check_preference(cfg: Config, problems: list[str]) -> None:
    objective, fmt, pref = cfg.train.objective, cfg.data.format, cfg.preference
    if objective != "sft" and fmt not in PREFERENCE_FORMATS:
        problems.append(
            f"train.objective: {objective!r} trains on (chosen, rejected) pairs, but data.format is {fmt!r}; "
            f"set data.format to one of {', '.join(repr(f) for f in PREFERENCE_FORMATS)}"
        )
    if objective == "sft" and fmt in PREFERENCE_FORMATS:
        problems.append(
            f"data.format: {fmt!r} holds preference pairs, but train.objective is 'sft'; set train.objective "
            f"to one of {', '.join(repr(o) for o in OBJECTIVES[1:])}"
        )
    if fmt in PREFERENCE_FORMATS and cfg.data.pack_to_max_length:
        problems.append(
            "data.pack_to_max_length: expected false when data.format is a preference format "
            "(each pair is one row: chosen, then rejected); set data.pack_to_max_length = false"
        )
    if objective in ("orpo", "simpo", "reward") and pref.reference == "model":
        problems.append(
            f"preference.reference: {objective} has no reference model, got 'model'; set preference.reference "
            "to 'none' or 'auto' (or train.objective to 'dpo' or 'ipo')"
        )
    if objective in ("ipo", "orpo", "reward") and pref.label_smoothing > 0:
        problems.append(
            f"preference.label_smoothing: {objective} has no label smoothing, got {pref.label_smoothing}; "
            "set it to 0 (it applies to dpo and simpo)"
        )
    if objective != "sft" and cfg.train.sequence_parallel > 1:
        problems.append(
            f"train.sequence_parallel: {objective!r} runs each (chosen, rejected) pair whole on one rank, got "
            f"{cfg.train.sequence_parallel}; set train.sequence_parallel = 1 for preference objectives"
        )
    eval_fmt = cfg.eval.format if cfg.eval.data and cfg.eval.format else fmt
    if objective != "sft" and eval_fmt != fmt and eval_fmt not in PREFERENCE_FORMATS:
        problems.append(
            f"eval.format: {objective!r} evaluates (chosen, rejected) pairs, but eval.format is {eval_fmt!r}; "
            f"set eval.format to one of {', '.join(repr(f) for f in PREFERENCE_FORMATS)} or leave it empty"
        )
    if objective == "sft" and eval_fmt != fmt and eval_fmt in PREFERENCE_FORMATS:
        problems.append(
            f"eval.format: {eval_fmt!r} holds preference pairs, but train.objective is 'sft'; set eval.format "
            "to the format of the held-out data"
        )
    best = cfg.save.best_metric
    if objective == "sft" and best in PREFERENCE_BEST:
        problems.append(
            f"save.best_metric: {best!r} is a preference objective's figure, but train.objective is 'sft'; "
            "use 'eval_loss' or 'eval_perplexity'"
        )
    if objective != "sft" and best == "eval_perplexity":
        problems.append(
            f"save.best_metric: 'eval_perplexity' is the next-token loss's figure, but train.objective is "
            f"{objective!r}; use one of 'eval_loss', {', '.join(repr(b) for b in PREFERENCE_BEST)}"
        )


def validate(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"expected a TOML table at the top level, got {type(raw).__name__}"])
    for key in raw:
        if key not in SECTIONS:
            problems.append(
                f"{key}: unknown section{_did_you_mean(key, SECTIONS)} (valid sections: {', '.join(SECTIONS)})"
            )
    sections = {}
    for name, cls in SECTIONS.items():
        if name in ("model", "data") and name not in raw:
            problems.append(f"{name}: required section [{name}] is missing")
        sections[name] = _check_section(name, cls, raw.get(name, {}), problems)
    cfg = Config(**sections, source=source)
    _check_across(cfg, problems)
    _check_eval(cfg, problems)
    _check_preference(cfg, problems)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4). The value is read as TOML, else as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("-o/--cfg-options", [f"{text!r}: expected KEY.PATH=VALUE, e.g. train.lr=1e-4"])
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("-o/--cfg-options", [f"{text!r}: {part} is not a table"])
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read, override and validate a TOML config.

    Args:
        path: a .toml file, or the name of a built-in config (see ``tunex list-cfg``).
        overrides: ``KEY.PATH=VALUE`` strings applied before validation (XTuner's --cfg-options).

    Raises:
        ConfigError: listing every problem; FileNotFoundError when neither a file nor a built-in name.
    """
    from tunex.builtin_configs import resolve

    file = resolve(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(file), [f"not valid TOML: {e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(file), [f"not UTF-8 text (byte {e.start})"]) from None
    return validate(apply_overrides(raw, overrides), source=str(file))


if __name__ == "__main__":
    print(describe())
