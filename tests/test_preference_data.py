"""Preference pairs: record forms, rendering and masks, the truncation rule, bad input, the dataset row."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from test_data_helpers import chatml_tokenizer, runs
from tunex.data import formats as F
from tunex.data import preference as P
from tunex.data.dataset import build_dataset
from tunex.data.encode import Encoder
from tunex.errors import DataError
from tunex.templates import get_template

SYSTEM = "<|im_start|>system\nYou are helpful<|im_end|>\n"


def pair_encoder(tok, max_length=512, system=""):
    return P.PairEncoder(tok, template=get_template("auto", tok), system=system, max_length=max_length)


def sides(enc):
    """[(ids, mask)] per sample of an Encoded."""
    out, at = [], 0
    for n in enc.lengths:
        out.append((enc.ids[at : at + n], enc.mask[at : at + n]))
        at += int(n)
    return out


def test_standard_form_renders_like_the_chat_of_each_side():
    tok = chatml_tokenizer()
    enc = pair_encoder(tok).encode([F.mapper("preference")({"prompt": "2+2?", "chosen": "4", "rejected": "5"})])
    assert len(enc.lengths) == 2 and enc.dropped == 0
    sft = Encoder(tok, template=get_template("auto", tok), max_length=512)
    for (ids, mask), answer in zip(sides(enc), ["4", "5"]):
        conv = F.openai([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}])
        want = sft.encode([conv])  # the SFT encoder of the same conversation is the oracle
        assert ids.tolist() == want.ids.tolist() and mask.tolist() == want.mask.tolist()
        assert runs(tok, ids, mask) == [
            (SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
            (answer + "<|im_end|>", True),
            ("\n", False),
        ]


def test_conversational_xtuner_form_trains_only_the_responses():
    tok = chatml_tokenizer()
    record = {
        "prompt": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    enc = pair_encoder(tok).encode([F.mapper("preference")(record)])
    (c_ids, c_mask), (r_ids, r_mask) = sides(enc)
    head = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    head += "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    assert runs(tok, c_ids, c_mask) == [(head, False), ("yes<|im_end|>", True), ("\n", False)]
    assert runs(tok, r_ids, r_mask) == [(head, False), ("no<|im_end|>", True), ("\n", False)]


@pytest.mark.parametrize(
    "record, prompt, chosen, rejected",
    [
        (  # TRL's implicit prompt, conversational: the shared messages
            {
                "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}],
            },
            [("user", "hi")],
            "hello",
            "go",
        ),
        (  # UltraFeedback's form: a prompt string, and sides that hold the whole conversation again
            {
                "prompt": "hi",
                "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}],
            },
            [("user", "hi")],
            "hello",
            "go",
        ),
        (  # standard: the shared words
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            [("user", "The sky is")],
            "blue.",
            "green.",
        ),
    ],
)
def test_implicit_prompt(record, prompt, chosen, rejected):
    p = F.mapper("preference")(record)
    assert [(m.role, m.content) for m in p.prompt] == prompt and not any(m.loss for m in p.prompt)
    assert [(m.content, m.loss) for m in p.chosen] == [(chosen, True)]
    assert [(m.content, m.loss) for m in p.rejected] == [(rejected, True)]


def test_truncation_cuts_the_prompt_from_the_left_first_then_the_responses():
    tok = chatml_tokenizer()
    prompt = "p" * 100
    record = {"prompt": prompt, "chosen": "c" * 10, "rejected": "r" * 30}
    full = pair_encoder(tok).encode([P.pair(record)])
    longest = int(full.lengths.max())
    # 1. a little over: only the prompt's start goes, both sides keep every response token
    enc = pair_encoder(tok, max_length=longest - 20).encode([P.pair(record)])
    assert enc.truncated == 1 and enc.dropped == 0
    (c_ids, c_mask), (r_ids, r_mask) = sides(enc)
    assert int(enc.lengths.max()) == longest - 20
    assert runs(tok, r_ids, r_mask)[1] == ("r" * 30 + "<|im_end|>", True)
    assert runs(tok, c_ids, c_mask)[1] == ("c" * 10 + "<|im_end|>", True)
    kept = runs(tok, c_ids, c_mask)[0][0]
    assert kept.endswith("p" * 50 + "<|im_end|>\n<|im_start|>assistant\n") and not kept.startswith("<|im_start|>")
    # 2. far over: the prompt keeps max_length // 2 tokens, then the longer response is cut at its end
    enc = pair_encoder(tok, max_length=40).encode([P.pair(record)])
    (c_ids, c_mask), (r_ids, r_mask) = sides(enc)
    assert enc.truncated == 1 and len(r_ids) == 40 and len(c_ids) == 20 + 11 + 1
    assert runs(tok, r_ids, r_mask) == [(runs(tok, r_ids, r_mask)[0][0], False), ("r" * 20, True)]
    assert len(runs(tok, r_ids, r_mask)[0][0].replace("<|im_end|>", "E").replace("<|im_start|>", "S")) == 20
    # untouched pairs count nothing
    assert pair_encoder(tok).encode([P.pair(record)]).truncated == 0


def test_fit_pair_drops_a_pair_left_without_targets():
    chosen = (list(range(10)), [(8, 10)])
    rejected = (list(range(12)), [(8, 12)])
    fitted, cut = P.fit_pair(chosen, rejected, max_length=8)  # prompt 8 -> keeps 4, responses fit
    assert cut and [len(ids) for ids, _ in fitted] == [6, 8]
    assert [m.tolist() for _, m in fitted] == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert P.fit_pair((list(range(10)), [(9, 10)]), rejected, max_length=2)[0] is None  # 1 prompt token left


def test_chatterbot_pairs_rule():
    p = F.mapper("chatterbot_pairs")(["q1", "a1", "q2", "a2", "q3"])
    assert [(m.role, m.content) for m in p.prompt] == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    assert [(m.content, m.loss) for m in p.chosen] == [("a2", True)]
    assert [(m.content, m.loss) for m in p.rejected] == [("q2", True)]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "x", "rejected": "y"}, "missing field 'chosen'"),
        ({"prompt": "x", "chosen": "y"}, "missing field 'rejected'"),
        ({"prompt": "x", "chosen": "y", "rejected": 3}, "fields 'chosen' and 'rejected': expected both strings"),
        (
            {"prompt": [{"role": "user", "content": 5}], "chosen": [], "rejected": []},
            "prompt[0].content: expected a string, got a number",
        ),
        (
            {"chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "n"}]},
            "chosen[0]: missing field 'content'",
        ),
        ({"prompt": 1, "chosen": [], "rejected": []}, "field 'prompt': expected a string or a list of messages"),
        ("text", "expected a JSON object with 'chosen' and 'rejected', got a string"),
    ],
)
def test_bad_records_name_the_field(record, message):
    with pytest.raises(F.RecordError) as e:
        P.pair(record)
    assert message in str(e.value)


def data_cfg(path, max_length=512):
    return SimpleNamespace(
        path=str(path),
        format="preference",
        template="auto",
        system="",
        max_length=max_length,
        pack_to_max_length=False,
        shuffle_before_pack=False,
        num_workers=0,
        cache_dir="",
    )


def test_dataset_row_is_chosen_then_rejected_and_counts(tmp_path):
    tok = chatml_tokenizer()
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": [], "rejected": [{"role": "assistant", "content": "x"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_dataset(data_cfg(path), tok, seed=0, cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and not ds.packed
    assert ds.stats["identical_pairs"] == 1 and ds.stats["dropped"] == 1 and ds.stats["records"] == 3
    ids, labels, pos = ds.arrays(0)
    chosen = pair_encoder(tok).encode([P.pair(rows[0])])
    n = int(chosen.lengths[0])
    assert ids.tolist() == chosen.ids.tolist()
    assert pos.tolist() == list(range(n)) + list(range(len(ids) - n))  # two documents: no cross attention
    assert np.array_equal(labels != -100, chosen.mask.astype(bool))


def test_bad_record_in_a_file_names_file_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q"}))
    with pytest.raises(DataError, match=r"d.jsonl, line 2: missing field 'chosen'"):
        build_dataset(data_cfg(path), chatml_tokenizer(), seed=0, cache_dir=tmp_path / "cache")


# ---- config --------------------------------------------------------------------------------------

CFG = '[model]\npath = "m"\n[data]\npath = "d.jsonl"\n'


def load(tmp_path, text, overrides=()):
    import tunex

    p = tmp_path / "cfg.toml"
    p.write_text(CFG + text)
    return tunex.load_config(p, overrides)


def config_problems(tmp_path, text, overrides=()):
    import tunex

    with pytest.raises(tunex.ConfigError) as info:
        load(tmp_path, text, overrides)
    return info.value.problems


def test_preference_config_defaults_and_auto_choices(tmp_path):
    cfg = load(tmp_path, '[train]\nobjective = "dpo"\n', ['data.format="preference"', "data.pack_to_max_length=false"])
    p = cfg.preference
    assert (p.beta, p.label_smoothing, p.gamma, p.reference, p.length_normalize) == (0.1, 0.0, 0.5, "auto", "auto")
    assert [p.uses_reference(o) for o in ("dpo", "ipo", "orpo", "simpo")] == [True, True, False, False]
    assert [p.normalizes(o) for o in ("dpo", "ipo", "orpo", "simpo")] == [False, True, True, True]
    assert load(tmp_path, "[preference]\nlength_normalize = true\n").preference.normalizes("dpo")
    assert "[preference]" in cfg.to_toml()


def test_wrong_preference_combinations_are_config_errors(tmp_path):
    problems = config_problems(tmp_path, '[train]\nobjective = "orpo"\n[preference]\nreference = "model"\n')
    assert any(
        p.startswith("train.objective: 'orpo' trains on (chosen, rejected) pairs, but data.format") for p in problems
    )
    assert any(p.startswith("preference.reference: orpo has no reference model") for p in problems)
    problems = config_problems(tmp_path, "", ['data.format="preference"'])
    assert any(
        p.startswith("data.format: 'preference' holds preference pairs, but train.objective is 'sft'") for p in problems
    )
    assert any(p.startswith("data.pack_to_max_length: expected false") for p in problems)
    problems = config_problems(
        tmp_path,
        '[train]\nobjective = "ipo"\n[preference]\nlabel_smoothing = 0.1\nlength_normalize = "yes"\nbeta = 0\n',
        ['data.format="preference"', "data.pack_to_max_length=false"],
    )
    assert sorted(p.split(":")[0] for p in problems) == [
        "preference.beta",
        "preference.label_smoothing",
        "preference.length_normalize",
    ]


def test_held_out_pairs_and_their_best_metric_are_checked_against_the_objective(tmp_path):
    pairs = ['data.format="preference"', "data.pack_to_max_length=false", 'train.objective="dpo"']
    cfg = load(tmp_path, "", [*pairs, "eval.split=0.2", 'save.best_metric="eval_rewards/accuracies"'])
    assert cfg.save.best_metric == "eval_rewards/accuracies"
    assert load(tmp_path, "", [*pairs, 'eval.data="h.jsonl"', 'eval.format="chatterbot_pairs"']).eval.format
    problems = config_problems(
        tmp_path, "", [*pairs, 'eval.data="h.jsonl"', 'eval.format="alpaca"', 'save.best_metric="eval_perplexity"']
    )
    assert sorted(p.split(":")[0] for p in problems) == ["eval.format", "save.best_metric"]
    assert any("'dpo' evaluates (chosen, rejected) pairs, but eval.format is 'alpaca'" in p for p in problems)
    problems = config_problems(
        tmp_path, "", ['eval.data="h.jsonl"', 'eval.format="preference"', 'save.best_metric="eval_rewards/margins"']
    )
    assert sorted(p.split(":")[0] for p in problems) == ["eval.format", "save.best_metric"]
    assert any("'eval_rewards/margins' is a preference objective's figure" in p for p in problems)


def test_check_custom_dataset_shows_both_sides_and_counts_identical_pairs(tmp_path):
    from click.testing import CliRunner
    from test_data_helpers import save_tokenizer
    from tunex.cli import cli

    folder = save_tokenizer(chatml_tokenizer(), tmp_path / "m")
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[model]\npath = "{folder}"\n[data]\npath = "{data}"\nformat = "preference"\npack_to_max_length = false\n'
        '[train]\nobjective = "dpo"\n'
    )
    result = CliRunner().invoke(cli, ["check-custom-dataset", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "3. chosen after the template" in out and "[[good<|im_end|>]]" in out
    assert "3. rejected after the template" in out and "[[bad<|im_end|>]]" in out
    assert "4. rejected token ids" in out
    assert re.search(r"chosen == rejected \(pairs\) +1\n", out), out

    # log-dataset: a row as the model gets it, the chosen side then the rejected one, each with its targets
    logged = CliRunner().invoke(cli, ["log-dataset", str(cfg), "--show", "masked_text", "-n", "1"])
    assert logged.exit_code == 0, logged.output
    assert "== item 0 of 2" in logged.output and "item 1" not in logged.output
    assert re.search(r"\[-100 x\d+\]good<\|im_end\|>\[-100 x\d+\]bad<\|im_end\|>\[-100 x1\]", logged.output)
