"""The multimodal (LLaVA) side of a run: the model of a config with ``[vision]``, and its data.

Stages, as XTuner's LLaVA recipes:
- ``pretrain``: the projector alone trains; the LLM and the tower are frozen (caption data).
- ``finetune``: the projector and the LLM as ``[method]`` says (full / LoRA / QLoRA); the tower
  frozen, or with LoRA (``vision.tower_lora``). ``vision.projector_checkpoint`` names the pretrain
  stage's checkpoint whose projector this stage starts from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunex.errors import TunexError


def is_multimodal(cfg: Any) -> bool:
    vision = getattr(cfg, "vision", None)
    return bool(vision is not None and vision.path)


def image_token_layout(cfg: Any, tokenizer: Any) -> tuple[int, int]:
    """(image token id, positions per image) of the run, read from the configs alone (no weights)."""
    from tunex.models import read_config, resolve_model_path
    from tunex.models.llava import image_token_for
    from tunex.models.vision import read_vision_config

    vision = read_vision_config(resolve_model_path(cfg.vision.path))
    vision.feature_layer(cfg.vision.select_layer)
    llm = read_config(resolve_model_path(cfg.model.path))
    return image_token_for(tokenizer, llm.vocab_size), vision.num_patches


def build_image_dataset(cfg: Any, tokenizer: Any):
    """The run's :class:`tunex.data.multimodal.ImageDataset` (records read, images checked, tokenized)."""
    return build_image_datasets(cfg, tokenizer, held_out=False)[0]


def build_image_datasets(cfg: Any, tokenizer: Any, held_out: bool = True) -> tuple[Any, Any | None]:
    """(training dataset, held-out dataset or None) of a ``[vision]`` run, as ``cfg.eval`` says:
    ``eval.data`` read as the training data is (its own records and images), or ``eval.split``: whole
    samples held out as the text path holds out records (:func:`tunex.train.evaluate.split_indices`,
    the same samples whatever ``train.seed``). The held-out items keep their order (no shuffling).
    ``held_out=False``: the training data alone, all of it.
    """
    from tunex.data.images import read_processing
    from tunex.data.multimodal import ImageData, ImageDataset, read_image_data
    from tunex.models import resolve_model_path
    from tunex.templates import get_template
    from tunex.train.evaluate import eval_data_config, split_indices

    image_id, per_image = image_token_layout(cfg, tokenizer)
    template = get_template(cfg.data.template, tokenizer, system=cfg.data.system)
    processing = read_processing(resolve_model_path(cfg.vision.path))

    def read(data_cfg):
        return read_image_data(data_cfg, tokenizer, template, image_id, per_image)

    def dataset(data: ImageData, shuffle: bool) -> ImageDataset:
        return ImageDataset(
            data,
            processing,
            cfg.vision.image_aspect,
            packed=cfg.data.pack_to_max_length,
            max_length=cfg.data.max_length,
            seed=cfg.train.seed,
            shuffle=shuffle,
        )

    shuffle = cfg.data.shuffle_before_pack
    if held_out and cfg.eval.data:
        return dataset(read(cfg.data), shuffle), dataset(read(eval_data_config(cfg)), False)
    data = read(cfg.data)
    if held_out and cfg.eval.split > 0:
        kept, held = split_indices(len(data.samples), cfg.eval.split, "samples")
        return dataset(data.subset(kept), shuffle), dataset(data.subset(held), False)
    return dataset(data, shuffle), None


def projector_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The projector tensors (``linear_1.weight``...) of a tunex checkpoint, or of the newest one in a
    work dir."""
    from tunex.train import checkpoint

    path = Path(path)
    pth = checkpoint.latest(path) if path.is_dir() else path
    if pth is None or not pth.is_file():
        raise TunexError(f"vision.projector_checkpoint: {path} has no iter_N.pth; run the pretrain stage first")
    state = checkpoint.load(pth)
    model = state.get("model", {}) if isinstance(state, dict) else {}
    prefix = "multi_modal_projector."
    out = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    if not out:
        raise TunexError(f"vision.projector_checkpoint: {pth} holds no projector (multi_modal_projector.*) tensors")
    return out


def build_llava(cfg: Any, device: torch.device, build_llm, load_device: torch.device | None = None) -> nn.Module:
    """The LLaVA model of ``cfg``, with exactly the stage's trainable part requiring grad.

    ``build_llm(cfg, device, load_device)`` builds the LLM with its ``[method]`` (finetune stage).
    """
    from tunex.models import load_model, resolve_model_path
    from tunex.models.llava import LlavaModel, Projector, grow_vocab, image_token_for
    from tunex.models.vision import load_vision_tower
    from tunex.peft import apply_lora
    from tunex.tokenizer import load_tokenizer
    from tunex.train.build import weights_dtype

    v = cfg.vision
    dtype = weights_dtype(cfg.model.dtype, device)
    llm_path = resolve_model_path(cfg.model.path)
    if v.stage == "pretrain":
        lm = load_model(llm_path, dtype=dtype, device=device)  # frozen
    else:
        lm = build_llm(cfg, device, load_device)
    tokenizer = load_tokenizer(cfg.model.tokenizer or llm_path)
    image_id = image_token_for(tokenizer, lm.config.vocab_size)
    grow_vocab(lm, image_id + 1)
    tower = load_vision_tower(v.path, dtype=dtype, device=device)
    if v.tower_lora:
        m = cfg.method
        r, alpha = v.tower_lora_r or m.r, v.tower_lora_alpha or m.alpha
        apply_lora(tower, "all-linear", r, alpha, m.dropout, m.use_rslora, m.use_dora)
        for p in tower.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    projector = Projector(v.projector, tower.config.hidden_size, lm.config.hidden_size).to(device)
    if v.projector_checkpoint:
        state = projector_state(v.projector_checkpoint)
        try:
            projector.load_state_dict(state)
        except RuntimeError as exc:
            raise TunexError(
                f"vision.projector_checkpoint: {v.projector_checkpoint} does not fit vision.projector "
                f"{v.projector!r} between this tower and LLM: {str(exc).splitlines()[0]}"
            ) from None
    projector.requires_grad_(True)
    return LlavaModel(tower, projector, lm, image_id, v.select_layer)
