"""LLaVA: a vision tower, a projector and tunex's decoder, as XTuner's and transformers' LLaVA.

Each image becomes ``P`` patch features (the tower's layer ``select_layer``, CLIP's class token
dropped), the projector maps them to the LLM's hidden size, and they take the place of ``P``
image-token positions in the prompt (the data pipeline writes one ``image_token_id`` per patch
where a conversation says ``<image>``; labels are -100 there). The decoder then runs on the
merged embeddings: packed rows keep their documents apart exactly as for text.

Module names follow transformers' ``LlavaForConditionalGeneration`` (``vision_tower``,
``multi_modal_projector.linear_1/linear_2``, ``language_model``), so export is a renaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunex import runtime as runtimes
from tunex.errors import FormatError
from tunex.models.decoder import CausalLM, KVCache
from tunex.models.vision import VisionTower

PROJECTORS = ("mlp2x_gelu", "linear")
IMAGE_TOKEN = "<image>"


class Projector(nn.Module):
    """``mlp2x_gelu`` (LLaVA-1.5): Linear -> GELU -> Linear; ``linear`` (LLaVA-1): one Linear."""

    def __init__(self, kind: str, vision_size: int, text_size: int):
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"projector {kind!r}: expected one of {', '.join(PROJECTORS)}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_size, text_size)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return self.linear_2(F.gelu(x)) if self.kind == "mlp2x_gelu" else x


class LlavaModel(nn.Module):
    """``model(input_ids, position_ids, cache, last_only, pixel_values) -> logits (B, T, V)``.

    ``pixel_values`` (N, 3, H, W) holds the images of the whole batch in reading order (row by row,
    left to right); their features fill the image-token positions in that order. Calls without
    images (decoding after the prompt) are plain decoder calls.
    """

    logit_softcap = None

    def __init__(
        self,
        tower: VisionTower,
        projector: Projector,
        language_model: CausalLM,
        image_token_id: int,
        select_layer: int = -2,
        keep_class: bool = False,
    ):
        super().__init__()
        from tunex.models.config import GEMMA

        if language_model.config.family in GEMMA:  # its decoder scales the embeddings itself
            raise FormatError(f"a LLaVA model's LLM cannot be {language_model.config.family} in tunex yet")
        self.vision_tower = tower
        self.multi_modal_projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self.select_layer = int(select_layer)
        self.keep_class = bool(keep_class)
        tower.config.feature_layer(self.select_layer)  # a bad layer fails here, not at the first batch

    @property
    def config(self):
        return self.language_model.config

    @property
    def lm_head(self):
        return self.language_model.lm_head

    @property
    def image_tokens(self) -> int:
        """Positions one image fills in the prompt."""
        return self.vision_tower.config.num_patches + int(self.keep_class and self.vision_tower.config.has_class_token)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.language_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.language_model.gradient_checkpointing = bool(on)
        self.vision_tower.gradient_checkpointing = bool(on)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, P, C_text) projected patch features of N images."""
        feats = self.vision_tower.features(pixel_values, self.select_layer, keep_class=self.keep_class)
        p = self.multi_modal_projector.linear_1.weight
        return self.multi_modal_projector(feats.to(p.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, C) with the image features in the image-token positions."""
        table = self.language_model.model.embed_tokens
        if pixel_values is None:  # decoding (or text): an image id is looked up as a token, as transformers does
            return table(input_ids)
        is_image = input_ids == self.image_token_id  # (B, T)
        n_images = int(pixel_values.shape[0])
        found = int(is_image.sum())
        if found != n_images * self.image_tokens:
            raise ValueError(
                f"the prompt has {found} image-token positions; {n_images} image(s) fill "
                f"{n_images * self.image_tokens} ({self.image_tokens} each): write one <image> per image"
            )
        if not found:
            return table(input_ids)
        # the image token may lie past the embedding table (an id added for images): look up 0 there
        embeds = table(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        feats = self.image_features(pixel_values).to(embeds.dtype)  # (N, P, C)
        return embeds.masked_scatter(is_image[..., None], feats.reshape(-1, feats.shape[-1]))

    def hidden_states(self, input_ids, position_ids=None, cache: KVCache | None = None, pixel_values=None):
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.model(input_ids, position_ids, cache, embeds=embeds)

    def forward(self, input_ids, position_ids=None, cache: KVCache | None = None, last_only=False, pixel_values=None):
        h = self.hidden_states(input_ids, position_ids, cache, pixel_values)
        if last_only:
            h = h[:, -1:]
        rt = self.language_model.model.runtime or runtimes.default()
        (logits,) = rt.project((self.language_model.lm_head,), h)
        return logits

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.language_model.new_cache(batch, max_len)

    def with_images(self, pixel_values: torch.Tensor | None) -> WithImages:
        """This model as :func:`tunex.models.generate` calls it, the images given to the prompt's call."""
        return WithImages(self, pixel_values)


class WithImages:
    """A LLaVA model whose first call (the prompt) gets ``pixel_values``; later calls decode text."""

    def __init__(self, model: LlavaModel, pixel_values: torch.Tensor | None):
        self.model, self.pixel_values = model, pixel_values
        self.config = model.config

    def parameters(self):
        return self.model.parameters()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch, max_len)

    def __call__(self, input_ids, position_ids=None, cache=None, last_only=False):
        pixels, self.pixel_values = self.pixel_values, None
        if pixels is not None:
            pixels = pixels.to(next(self.model.parameters()).device)
        return self.model(input_ids, position_ids, cache, last_only, pixel_values=pixels)


def grow_vocab(lm: CausalLM, size: int) -> None:
    """Give the LLM's embedding (and an untied head) ``size`` rows, new rows the mean of the old
    (as transformers' resize_token_embeddings): room for an image token the tokenizer lacks."""
    table = lm.model.embed_tokens
    old = table.weight.shape[0]
    if size <= old:
        return
    with torch.no_grad():
        w = table.weight
        grown = torch.cat((w, w.float().mean(0, keepdim=True).to(w.dtype).expand(size - old, -1)))
        table.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
        table.num_embeddings = size
        head = lm.lm_head
        if isinstance(head, nn.Linear) and head.weight is not w:
            hw = head.weight
            head.weight = nn.Parameter(
                torch.cat((hw, hw.float().mean(0, keepdim=True).to(hw.dtype).expand(size - old, -1))),
                requires_grad=hw.requires_grad,
            )
            head.out_features = size
    lm.config.vocab_size = size


def image_token_for(tokenizer, vocab_size: int) -> int:
    """The id the image placeholders get: the tokenizer's ``<image>`` when it has one, else the first
    id past the tokenizer (inside the embedding's spare rows when it has some)."""
    own = tokenizer.token_to_id(IMAGE_TOKEN)
    return int(own) if own is not None else len(tokenizer)


# ---- LLaVA folders (transformers' LlavaForConditionalGeneration) ------------------------------


def _llm_name(name: str) -> str | None:
    for old, new in (
        ("language_model.model.", "model."),  # transformers 4 names (and what 5 writes)
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),  # transformers 5's own module names
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _projector_name(name: str) -> str | None:
    for prefix in ("model.multi_modal_projector.", "multi_modal_projector."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def is_llava_folder(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == "llava"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_llava(path, *, dtype=torch.float32, device="cpu") -> LlavaModel:
    """Load a LLaVA folder as transformers writes it (``convert pth_to_hf`` of a multimodal run).

    Raises:
        FormatError naming the folder for a config tunex cannot run or weights that do not fit.
    """
    from tunex.models.config import config_from_hf, to_tunex_names
    from tunex.models.hub import resolve_model_path
    from tunex.models.loading import _as_dtype, _no_init, new_model, read_checkpoint
    from tunex.models.vision import fill_tower, tower_state_name, vision_config_from_hf

    folder = resolve_model_path(path)
    source = folder / "config.json"
    raw = json.loads(source.read_text(encoding="utf-8"))
    if raw.get("model_type") != "llava":
        raise FormatError(f"{source}: model_type {raw.get('model_type')!r}: expected 'llava'")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise FormatError(f"{source}: expected a 'text_config' object")
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise FormatError(f"{source}: vision_feature_layer {layer!r}: tunex takes one layer (an integer)")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise FormatError(f"{source}: vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'")
    if raw.get("projector_hidden_act", "gelu") != "gelu" or raw.get("multimodal_projector_bias", True) is not True:
        raise FormatError(f"{source}: tunex runs the gelu projector with biases (LLaVA-1.5's mlp2x_gelu)")
    dtype = _as_dtype(dtype)
    lm_cfg = config_from_hf(text, f"{source}: text_config")
    vision_cfg = vision_config_from_hf(raw, str(source))
    with _no_init():
        lm = new_model(lm_cfg)
        tower = VisionTower(vision_cfg)
        projector = Projector("mlp2x_gelu", vision_cfg.hidden_size, lm_cfg.hidden_size)
    tower_part, problems = [], []
    for name, tensor in read_checkpoint(folder):
        if name.startswith(("vision_tower.", "model.vision_tower.")):
            if tower_state_name(name) is not None:  # None: SigLIP's pooling head, which LLaVA does not use
                tower_part.append((name, tensor))
            continue
        target = _projector_name(name)
        if target is not None:
            _place_or_note(projector, target, tensor, dtype, device, problems, name)
            continue
        target = _llm_name(name)
        if target is None:
            problems.append(f"unexpected tensor {name!r}")
            continue
        for tunex_name, part in to_tunex_names(target, tensor, lm_cfg):
            if tunex_name == "lm_head.weight" and lm_cfg.tie_word_embeddings:
                continue
            _place_or_note(lm, tunex_name, part, dtype, device, problems, name)
    fill_tower(tower, tower_part, dtype, device, str(folder))
    missing = [n for n, p in [*lm.named_parameters(), *projector.named_parameters()] if p.is_meta]
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    if problems:
        raise FormatError(f"{folder}: checkpoint does not match config.json: " + "; ".join(problems[:4]))
    image_token = raw.get("image_token_id", raw.get("image_token_index"))
    if not isinstance(image_token, int):
        raise FormatError(f"{source}: expected an integer image_token_id")
    model = LlavaModel(tower, projector, lm, image_token, layer, keep_class=strategy == "full")
    return model.eval()


def _place_or_note(module, name, tensor, dtype, device, problems: list[str], ckpt_name: str) -> None:
    from tunex.models.loading import _place

    try:
        _place(module, name, tensor, dtype, device)
    except (KeyError, AttributeError):
        problems.append(f"unexpected tensor {ckpt_name!r}")


def hf_state(model: LlavaModel, llm_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' LLaVA checkpoint names (as the hub's llava-hf
    folders: ``language_model.model.…``, ``vision_tower.vision_model.…``, ``multi_modal_projector.…``).

    ``llm_state``: the LLM's weights in its family's checkpoint names (e.g. LoRA already merged);
    default: the model's own.
    """
    from tunex.models.config import to_checkpoint_names

    if model.multi_modal_projector.kind != "mlp2x_gelu":
        raise FormatError(
            "transformers' LLaVA has the mlp2x_gelu projector only; a 'linear' projector cannot be exported "
            "as a LlavaForConditionalGeneration folder"
        )
    lm = model.language_model
    if llm_state is None:
        llm_state = to_checkpoint_names({k: v for k, v in lm.state_dict().items()}, lm.config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in llm_state.items():
        if name.startswith("lm_head.") and lm.config.tie_word_embeddings:
            continue
        out["language_model." + name] = tensor
    for name, tensor in model.vision_tower.state_dict().items():
        out["vision_tower." + name] = tensor
    for name, tensor in model.multi_modal_projector.state_dict().items():
        out["multi_modal_projector." + name] = tensor
    return out


def hf_config(model: LlavaModel, text_config: dict, image_token_id: int | None = None) -> dict:
    """config.json of the LLaVA folder for ``model`` (``text_config``: the LLM's own config.json)."""
    text = dict(text_config)
    text["vocab_size"] = int(model.language_model.model.embed_tokens.weight.shape[0])
    tower = model.vision_tower.config
    vision = dict(tower.raw)
    if tower.kind == "siglip":
        vision["vision_use_head"] = False  # the export has no pooling head (LLaVA reads patch features)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": int(model.image_token_id if image_token_id is None else image_token_id),
        "image_seq_length": model.image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": model.select_layer,
        # "default" drops the first feature: CLIP's class token (SigLIP has none)
        "vision_feature_select_strategy": "full" if model.keep_class or not tower.has_class_token else "default",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
    }
