"""The serving engine: one model, its LoRA adapters on the shared base, and a worker that runs jobs.

Jobs run one at a time, first come first served, on one worker thread: a request's tokens are
exactly what it would get alone (no batch-dependent numerics), and no two requests ever share a
KV cache or an adapter. Adapters stay unmerged: each is a set of :class:`tunex.peft.LoRALinear`
layers whose ``weight`` is the base layer's own tensor (no copy of the base), swapped into the
model before a job of that adapter runs (a few hundred attribute sets; jobs of the same adapter in
a row swap nothing).

A job reports through its ``emit(kind, value)`` callback, called on the worker thread: ``"text"``
with each new piece of reply text (stop strings held back until they cannot start one), then
``"done"`` with a :class:`JobResult`, or ``"error"`` with the exception. A job whose ``cancel()`` was
called (its client went away) is skipped if still queued, or stops at its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunex.errors import TunexError

log = logging.getLogger("tunex.serve")


class ServeError(TunexError):
    """A request the engine cannot run; ``status``/``code`` are the HTTP status and OpenAI error code."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class JobResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class Job:
    """One generation: prompt ids, the adapter (None = the base model) and the sampling settings."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    chat: bool = False  # a chat reply: the template's end-of-turn words stop it too
    emit: Callable[[str, object], None] = lambda kind, value: None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class _Stopped(Exception):
    """A stop string appeared: the reply is complete."""


class _Cancelled(Exception):
    """The job's client went away."""


class AdapterBank:
    """LoRA adapters loaded unmerged over one model's base layers, one of them active at a time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.base: dict[str, nn.Module] = {}  # module name -> the base layer it replaces
        self.layers: dict[str, dict[str, nn.Module]] = {}  # adapter -> module name -> LoRA layer
        self.active: str | None = None

    def add(self, name: str, folder: str | Path) -> None:
        """Load the PEFT LoRA adapter ``folder`` as ``name``."""
        from tunex.models.adapter import _LORA_KEY, PREFIX, apply_adapter, read_adapter

        if name in self.layers:
            raise ValueError(f"--adapter {name}: that name is given twice")
        _, tensors = read_adapter(folder)
        extra = [k for k in tensors if not _LORA_KEY.match(k[len(PREFIX) :] if k.startswith(PREFIX) else k)]
        if extra:
            raise TunexError(
                f"{folder}: the adapter replaces base tensors ({', '.join(sorted(extra)[:3])}: modules_to_save), "
                "which serving over one shared base cannot do; merge it (tunex convert merge) and serve the "
                "merged model"
            )
        self.use(None)
        before = dict(self.model.named_modules())
        names = apply_adapter(self.model, folder)
        self.layers[name] = {m: self.model.get_submodule(m) for m in names}
        for m in names:
            self.base.setdefault(m, before[m])
        self.active = name
        self.use(None)

    def use(self, name: str | None) -> None:
        """Make ``name``'s layers (None: the plain base) the model's."""
        if name == self.active:
            return
        if self.active is not None:
            for m in self.layers[self.active]:
                self._set(m, self.base[m])
        if name is not None:
            for m, layer in self.layers[name].items():
                self._set(m, layer)
        self.active = name

    def _set(self, module: str, layer: nn.Module) -> None:
        owner, _, attr = module.rpartition(".")
        setattr(self.model.get_submodule(owner), attr, layer)


class Engine:
    """A model, its tokenizer and chat template, its adapters, and the worker thread running jobs.

    ``name`` is what requests call the base model; adapters are called by their own names.
    """

    def __init__(self, model, tokenizer, template, name: str, adapters: dict[str, str | Path] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        self.bank = AdapterBank(model)
        for adapter, folder in (adapters or {}).items():
            if adapter == name:
                raise ValueError(f"--adapter {adapter}: the base model is served under that name already")
            self.bank.add(adapter, folder)
        self.eos_ids = list(model.config.eos_token_ids)
        self.context_length = int(model.config.max_position_embeddings)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @classmethod
    def load(
        cls,
        model: str,
        adapters: dict[str, str | Path] | None = None,
        *,
        name: str | None = None,
        prompt_template: str = "auto",
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Engine:
        from tunex.models import load_model, resolve_model_path
        from tunex.templates import get_template
        from tunex.tokenizer import load_tokenizer

        folder = resolve_model_path(model)
        tokenizer = load_tokenizer(folder)
        template = get_template(prompt_template, tokenizer)
        lm = load_model(folder, dtype=dtype, device=device)
        return cls(lm, tokenizer, template, name or default_name(model), adapters)

    # ---- what requests may ask for --------------------------------------------------------------

    def models(self) -> list[str]:
        """The names a request's ``model`` may take: the base model first, then the adapters."""
        return [self.name, *self.bank.layers]

    def adapter_of(self, model: str) -> str | None:
        if model == self.name:
            return None
        if model in self.bank.layers:
            return model
        raise ServeError(
            f"The model {model!r} does not exist; this server has: {', '.join(self.models())}",
            status=404,
            code="model_not_found",
            param="model",
        )

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Render ``messages`` with the chat template (ready for the assistant's reply) and encode."""
        from tunex.errors import DataError

        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except (DataError, TypeError, ValueError) as exc:
            raise ServeError(f"messages: {exc}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The number of new tokens a job may make: ``max_tokens``, or what the context leaves."""
        room = self.context_length - prompt_tokens
        if max_tokens is None:
            if room < 1:
                raise ServeError(
                    f"This model's maximum context length is {self.context_length} tokens; the prompt has "
                    f"{prompt_tokens}. Shorten the prompt.",
                    code="context_length_exceeded",
                    param="messages",
                )
            return room
        if max_tokens > room:
            raise ServeError(
                f"This model's maximum context length is {self.context_length} tokens; you requested "
                f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
                "Lower max_tokens or shorten the prompt.",
                code="context_length_exceeded",
                param="max_tokens",
            )
        return max_tokens

    # ---- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="tunex-serve-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; its ``emit`` is called from the worker thread."""
        self._queue.put(job)

    def pending(self) -> int:
        return self._queue.qsize()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                log.info("tunex serve: a job was cancelled before it started (its client went away)")
                continue
            try:
                result = self.run(job)
            except _Cancelled:
                continue
            except Exception as exc:  # a request never takes the server down
                log.exception("tunex serve: a job failed")
                job.emit("error", exc)
                continue
            job.emit("done", result)

    def run(self, job: Job) -> JobResult:
        """Run ``job`` on the calling thread (the worker's loop calls this)."""
        from tunex.models.generate import stop_settings

        words = list(job.stop) + (list(self.template.stop_words) if job.chat else [])
        stop_ids, stops = stop_settings(self.tokenizer, words, self.eos_ids)
        hold = max((len(s) for s in stops), default=1) - 1
        out: list[int] = []
        state = {"sent": 0, "text": "", "stopped": False}

        def on_token(token: int) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a multi-byte character is still being spelled out
                return
            cut = _first_stop(text, stops, max(0, state["sent"] - hold))
            if cut is not None:
                text = text[:cut]
            safe = len(text) if cut is not None else len(text) - hold
            if safe > state["sent"]:
                job.emit("text", text[state["sent"] : safe])
                state["sent"] = safe
            state["text"] = text
            if cut is not None:
                state["stopped"] = True
                raise _Stopped

        try:
            self.generate_ids(job, stop_ids, on_token)
        except _Stopped:
            pass
        except _Cancelled:
            log.info("tunex serve: a job was cancelled after %d tokens (its client went away)", len(out))
            raise
        if not state["stopped"]:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            cut = _first_stop(text, stops, 0)
            state["text"] = text if cut is None else text[:cut]
            if len(state["text"]) > state["sent"]:
                job.emit("text", state["text"][state["sent"] :])
        finish = "stop" if state["stopped"] or len(out) < job.max_tokens else "length"
        return JobResult(state["text"], len(job.prompt_ids), len(out), finish)

    def generate_ids(self, job: Job, stop_ids: list[int], on_token: Callable[[int], None]) -> None:
        """Decode ``job`` token by token into ``on_token`` (which may raise to end the job early)."""
        from tunex.models.generate import GenerationConfig, generate

        settings = GenerationConfig(
            max_new_tokens=job.max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            stop_token_ids=stop_ids,
        )
        self.bank.use(job.adapter)
        generate(self.model, job.prompt_ids, settings, streamer=on_token)


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


def default_name(model: str) -> str:
    """What requests call the base model by default: its folder or file name (``.gguf`` dropped)."""
    text = str(model).rstrip("/")
    base = text.rsplit("/", 1)[-1] or text
    return base[: -len(".gguf")] if base.lower().endswith(".gguf") else base


def as_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` resolved like ``tunex chat``: CUDA when present; bfloat16 there, float32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype
