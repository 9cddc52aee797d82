"""convert pth_to_hf: the adapter of a LoRA/QLoRA run loads in PEFT (test oracle) and its logits
match tunex's own model; a full run becomes a HF folder transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.cli import cli
from tunex.config import load_config
from tunex.errors import FormatError
from tunex.models import load_model
from tunex.peft import apply_lora
from tunex.train.export import checkpoint_as_adapter, convert_checkpoint
from tunex.train.loop import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A LoRA (DoRA off) run of 6 steps on the tiny tied model; (config path, checkpoint, model dir)."""
    root = tmp_path_factory.mktemp("p2h")
    model = make_tiny_model(root / "m")
    cfg = write_config(
        root / "c.toml", model, make_data(root / "d", "instruct"), "lora", "openai", root / "w", max_steps=6, lr=2e-2
    )
    train(load_config(cfg))
    return cfg, root / "w" / "iter_6.pth", model


def tunex_logits(cfg_path, pth, ids):
    cfg = load_config(cfg_path)
    model = load_model(cfg.model.path)
    m = cfg.method
    apply_lora(model, m.target_modules, m.r, m.alpha, m.dropout, m.use_rslora, m.use_dora)
    state = torch.load(pth, weights_only=True)["model"]
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model.eval()(ids)


def test_adapter_loads_in_peft_and_logits_match(tmp_path, trained):
    cfg, pth, model_dir = trained
    result = CliRunner().invoke(cli, ["convert", "pth_to_hf", str(cfg), str(pth), str(tmp_path / "a"), "--fp32"])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 200, (2, 13))
    ours = tunex_logits(cfg, pth, ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    theirs_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))(input_ids=ids).logits
    assert (plain - theirs).abs().max() > 1e-3  # the adapter is not a no-op


def test_default_dtype_is_fp16_like_xtuner(tmp_path, trained):
    from safetensors.torch import load_file

    cfg, pth, _ = trained
    convert_checkpoint(load_config(cfg), pth, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float16 for t in tensors.values())
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == load_config(cfg).model.path


def test_config_of_another_method_is_refused(tmp_path, trained):
    cfg, pth, _ = trained
    with pytest.raises(FormatError, match="method.kind"):
        convert_checkpoint(load_config(cfg, ["method.kind=full"]), pth, tmp_path / "x")


def test_checkpoint_as_adapter_is_fp32(tmp_path, trained):
    from safetensors.torch import load_file

    cfg, pth, _ = trained
    out = checkpoint_as_adapter(load_config(cfg), pth, tmp_path / "a")
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "adapter_model.safetensors")).values())


def test_full_checkpoint_becomes_a_transformers_model(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", tied=False)
    cfg = write_config(
        tmp_path / "c.toml",
        model_dir,
        make_data(tmp_path / "d", "pretrain"),
        "full",
        "pretrain",
        tmp_path / "w",
        max_steps=3,
        lr=1e-3,
    )
    train(load_config(cfg))
    convert_checkpoint(
        load_config(cfg), tmp_path / "w" / "iter_3.pth", tmp_path / "hf", fp32=True, max_shard_size="20KB"
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # 20KB forces shards
    # the run's end-of-turn/eos token, so transformers' generate stops where tunex chat does
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == 2
    ids = torch.randint(0, 200, (1, 9))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours = load_model(model_dir)
    ours.load_state_dict(torch.load(tmp_path / "w" / "iter_3.pth", weights_only=True)["model"])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_of_a_checkpoint_equals_the_adapted_model(tmp_path, trained):
    cfg, pth, model_dir = trained
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            "merge",
            str(model_dir),
            str(pth),
            str(tmp_path / "m"),
            "--config",
            str(cfg),
            "--dtype",
            "fp32",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 200, (1, 11))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tunex_logits(cfg, pth, ids), rtol=1e-4, atol=1e-4)


def test_merge_of_a_checkpoint_needs_its_config(tmp_path, trained):
    _, pth, model_dir = trained
    result = CliRunner().invoke(cli, ["convert", "merge", str(model_dir), str(pth), str(tmp_path / "m")])
    assert result.exit_code == 2 and "--config" in result.output


def test_an_output_folder_holding_other_files_is_refused_not_replaced(tmp_path, trained):
    cfg, pth, _ = trained
    out = tmp_path / "a"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds 'notes.txt', which is not part of a PEFT adapter folder"):
        convert_checkpoint(load_config(cfg), pth, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    convert_checkpoint(load_config(cfg), pth, out)  # an empty folder, or a previous adapter, is replaced
    convert_checkpoint(load_config(cfg), pth, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
