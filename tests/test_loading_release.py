"""Pages of a checkpoint map that were read only to be converted or quantized go back to the OS
(tunex.models.loading._release); nothing else is ever dropped."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file
from tunex.models.loading import _release, read_safetensors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _resident_kb(path) -> int:
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = head[5] if len(head) > 5 else None
            elif line.startswith("Rss:") and current == str(path):
                total += int(head[1])
    return total


def test_released_pages_leave_the_rss_and_read_back_from_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    original = torch.randn(4096, 256)  # 4 MB
    save_file({"w": original, "b": torch.arange(10.0)}, str(path))
    state = read_safetensors(path)
    w = state["w"]
    assert torch.equal(w, original)  # every page of w read
    before = _resident_kb(path)
    assert before >= 3 * 1024
    _release(w)
    assert _resident_kb(path) <= before - 3 * 1024
    assert torch.equal(w, original)  # faulted in again from the file, same bytes
    assert torch.equal(state["b"], torch.arange(10.0))


def test_memory_outside_checkpoint_maps_is_never_dropped():
    t = torch.randn(4096, 256)
    copy = t.clone()
    _release(t)
    assert torch.equal(t, copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_with_conversion_and_quantization_keeps_the_weights(tmp_path, dtype):
    """A bf16 checkpoint loaded as fp32 (converted, source released) or as bf16 (views of the map),
    and a quantize hook that reads each linear (its pages released after): the loaded model is the
    checkpoint's, bit for bit."""
    import json

    from tunex.models import load_model
    from tunex.models.config import config_from_hf
    from tunex.models.decoder import CausalLM

    raw = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    ref = CausalLM(config_from_hf(raw))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"]}))
    seen = {}

    def hook(name, linear):
        seen[name] = linear.weight.clone()
        return linear

    model = load_model(tmp_path, dtype=dtype, quantize=hook)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p.float(), state[name].float(), rtol=0, atol=0, msg=name)
    for name, w in seen.items():
        torch.testing.assert_close(w.float(), state[name + ".weight"].float(), rtol=0, atol=0, msg=name)
