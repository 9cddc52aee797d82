"""The transformers backend (model.backend): an architecture tunex's decoder does not define
(GPT-NeoX) trains with tunex's data, loop and LoRA layers, then pth_to_hf -> convert merge -> chat,
against transformers + PEFT as the oracles; unknown architectures get one line naming them."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_train_helpers import make_data, make_tokenizer, write_config
from tunex.cli import cli
from tunex.errors import FormatError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def make_neox(folder, seed: int = 0):
    """A tiny random GPT-NeoX (partial rotary, parallel residual, biases, untied head) with the test
    tokenizer; returns the transformers model."""
    vocab = make_tokenizer(folder)
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rotary_pct=0.25,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
        initializer_range=0.3,
    )
    model = transformers.GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_model_tunex_does_not_define_trains_converts_merges_and_chats(tmp_path):
    from tunex.models import load_model
    from tunex.models.hf_backend import HFCausalLM
    from tunex.train.metrics import read_metrics

    folder = tmp_path / "neox"
    hf = make_neox(folder)
    work = tmp_path / "work"
    cfg = write_config(
        tmp_path / "c.toml", folder, make_data(tmp_path / "d", "instruct"), "lora", "openai", work, lr=2e-2, max_steps=8
    )
    out = run("train", str(cfg))
    assert "model: gpt_neox on the transformers backend" in out
    losses = [r["loss"] for r in read_metrics(work)]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < 0.9 * losses[0], losses
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [6, 8]  # the eval hook generated through the backend

    adapter = tmp_path / "adapter"
    run("convert", "pth_to_hf", str(cfg), str(work / "iter_8.pth"), str(adapter))
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["r"] == 8
    # the adapter loads in PEFT under transformers' own names and gives tunex's logits
    ours = load_model(folder)
    assert isinstance(ours, HFCausalLM)
    from tunex.models.adapter import apply_adapter

    apply_adapter(ours, adapter)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 61]])
    loaded = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        expected = loaded(ids).logits
        torch.testing.assert_close(ours.eval()(ids), expected, atol=1e-4, rtol=1e-4)
        expected_merged = loaded.merge_and_unload()(ids).logits
    merged = tmp_path / "merged"
    run("convert", "merge", str(folder), str(adapter), str(merged), "-q")
    again = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected_merged, atol=1e-4, rtol=1e-4)

    # greedy chat on the merged folder (tokenizer files copied from the base) equals generate
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (merged / name).exists():
            (merged / name).write_bytes((folder / name).read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    reply = run("chat", str(merged), "--prompt", "Who wrote Hamlet?", "--temperature", "0", "--max-new-tokens", "8")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Who wrote Hamlet?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        new = again.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=[2, tok.convert_tokens_to_ids("<|im_end|>")],
        )[0, prompt.shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    assert reply.strip() == text.split("<|im_end|>")[0].strip()


def test_packed_rows_attend_within_their_documents(tmp_path):
    """transformers builds the per-document mask from position ids that restart (no attention mask,
    no cache): a packed row's hidden states equal its documents run one by one."""
    from tunex.models import load_model

    make_neox(tmp_path / "m")
    ours = load_model(tmp_path / "m")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 200, (n,), generator=g) for n in (7, 5, 1, 6)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = ours.hidden_states(ids, pos)[0]
        alone = torch.cat([ours.hidden_states(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_qlora_packs_the_linears_but_not_the_head(tmp_path):
    from tunex.models import load_model
    from tunex.quant import NF4Linear

    make_neox(tmp_path / "m")
    model = load_model(tmp_path / "m", quantize=lambda n, lin: NF4Linear.from_linear(lin))
    assert isinstance(model.gpt_neox.layers[0].attention.query_key_value, NF4Linear)
    head = model.get_output_embeddings()  # embed_out in transformers 4, lm_head in 5
    assert type(head) is torch.nn.Linear and model.lm_head is head


def test_unknown_architecture_is_one_line_naming_it(tmp_path):
    from tunex.models import load_model
    from tunex.models.hf_backend import choose_backend

    make_neox(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**raw, "model_type": "no_such_arch"}))
    with pytest.raises(FormatError, match=r"model_type 'no_such_arch' is not supported: it is neither one of tunex's"):
        load_model(tmp_path / "m")
    # backend "tunex": tunex's own reader refuses it and points at the backend
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"model_type 'gpt_neox' is not supported.*model.backend"):
        load_model(tmp_path / "m", backend="tunex")
    assert choose_backend(tmp_path / "m") == "transformers"


def test_checkpoint_that_does_not_fit_the_architecture_is_refused(tmp_path):
    """transformers would fill the missing weights with random values and only warn."""
    from test_train_helpers import make_tiny_model
    from tunex.models import load_model

    folder = make_tiny_model(tmp_path / "m")  # a Llama checkpoint
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "gpt_neox"}))
    with pytest.raises(FormatError, match=r"checkpoint does not match config.json \(gpt_neox, through transformers\)"):
        load_model(folder)


def test_missing_transformers_says_how_to_install_it(tmp_path, monkeypatch):
    from tunex.models import hf_backend

    make_neox(tmp_path / "m")
    monkeypatch.setattr(hf_backend, "_transformers", lambda: None)
    with pytest.raises(FormatError, match=r"'gpt_neox' is not supported by tunex's own .*pip install 'tunex\[hf\]'"):
        hf_backend.choose_backend(tmp_path / "m")


def test_loss_and_gradients_match_transformers_with_and_without_checkpointing(tmp_path):
    """tunex's loss (its chunked cross-entropy over the backend's hidden states and head) against
    transformers' own loss of the same adapted model; checkpointing gives the same gradients."""
    from tunex.dist.wrap import LossModule
    from tunex.models import load_model
    from tunex.peft import apply_lora

    make_neox(tmp_path / "m")
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100
    grads = []
    for checkpointing in (False, True):
        model = load_model(tmp_path / "m")
        apply_lora(model, "all-linear", 4, 8.0)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.gradient_checkpointing = checkpointing
        assert model.gradient_checkpointing == checkpointing
        model.train()
        loss = LossModule(model)(ids, labels, None)
        loss.backward()
        with torch.no_grad():
            torch.testing.assert_close(loss, model.hf(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-5)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_targets_matching_nothing_list_the_backend_models_linears(tmp_path):
    """preflight builds the transformers model on the meta device (no weights read) to match targets."""
    from tunex.errors import ConfigError
    from tunex.models.hf_backend import model_config
    from tunex.models.loading import meta_model
    from tunex.peft import select_targets

    make_neox(tmp_path / "m")
    model = meta_model(model_config(tmp_path / "m"))
    assert next(model.parameters()).is_meta
    assert "gpt_neox.layers.1.attention.query_key_value" in select_targets(model, "all-linear")
    with pytest.raises(ConfigError, match="query_key_value"):
        select_targets(model, ["q_proj"])
