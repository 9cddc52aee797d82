"""The serving engine: one model, its LoRA adapters on the shared base, and a worker that runs jobs.

The worker decodes the running jobs together (continuous batching): each step makes one token for
every running job in one forward per adapter, whose projections read each weight once for all of
them; a new job joins between steps (after its own prompt pass), a finished or cancelled one
leaves. A job whose prompt pass was run before (same adapter, prompt and cache size) starts from a
copy of it (tunex.serve.prompts). Every row of a step computes exactly what it computes decoded
alone (its own KV cache and positions, its attention by the same kernel call as alone, the GEMV
and norms bit for bit per row: tunex.kernels.gemv's ``token_rows``), so a request's tokens never
depend on what else runs. Models where that cannot be guaranteed (not the llama-family decoder in
float32 on the CPU with the Rust GEMV, or widths the element-wise kernels would split
differently) run their jobs one at a time, first come first served, as does ``max_batch=1``.

Adapters stay unmerged: each is a set of :class:`tunex.peft.LoRALinear` layers whose ``weight`` is
the base layer's own tensor (no copy of the base), swapped into the model before a forward of that
adapter's jobs (a few hundred attribute sets; none while the adapter stays).

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
        from tunex.io.hf import base_config_changes

        if base_config_changes(folder).get("rope_scaling"):
            raise TunexError(
                f"{folder}: the adapter trained with model.rope_scaling (tunex_base_config.json), which the shared "
                "base does not have; merge it (tunex convert merge) and serve the merged model"
            )
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

    def __init__(
        self,
        model,
        tokenizer,
        template,
        name: str,
        adapters: dict[str, str | Path] | None = None,
        max_batch: int = 16,
        prompt_cache_mb: int = 256,
    ):
        from tunex.serve.prompts import PromptCache

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (1: one job at a time), got {max_batch}")
        if prompt_cache_mb < 0:
            raise ValueError(f"prompt_cache_mb must be >= 0 (0: no prompt cache), got {prompt_cache_mb}")
        self.prompts = PromptCache(prompt_cache_mb << 20)
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
        self._running = 0
        self.most_rows = 0  # the most jobs one forward has decoded together so far
        why = _why_not_batched(model)
        if why is not None and max_batch > 1:
            log.info("tunex serve: jobs run one at a time: %s", why)
        self.max_batch = max_batch if why is None else 1

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
        max_batch: int = 16,
        prompt_cache_mb: int = 256,
    ) -> Engine:
        from tunex.models import load_model, resolve_model_path
        from tunex.templates import get_template
        from tunex.tokenizer import load_tokenizer

        folder = resolve_model_path(model)
        tokenizer = load_tokenizer(folder)
        template = get_template(prompt_template, tokenizer)
        lm = load_model(folder, dtype=dtype, device=device)
        return cls(lm, tokenizer, template, name or default_name(model), adapters, max_batch, prompt_cache_mb)

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
        """Jobs waiting for the worker."""
        return self._queue.qsize()

    def running(self) -> int:
        """Jobs the worker is decoding."""
        return self._running

    def _work(self) -> None:
        if self.max_batch == 1:
            self._work_alone()
        else:
            self._work_batched()

    def _work_alone(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                log.info("tunex serve: a job was cancelled before it started (its client went away)")
                continue
            self._running = 1
            try:
                result = self.run(job)
            except _Cancelled:
                continue
            except Exception as exc:  # a request never takes the server down
                log.exception("tunex serve: a job failed")
                job.emit("error", exc)
                continue
            finally:
                self._running = 0
            job.emit("done", result)

    @torch.inference_mode()
    def _work_batched(self) -> None:
        from tunex.kernels import registry
        from tunex.models.generate import decode_threads

        device = next(self.model.parameters()).device
        running: list[_Sequence] = []
        stopping = False
        while running or not stopping:
            # join: new jobs take their prompt pass (as generate does it, outside the decode threads)
            while not stopping and len(running) < self.max_batch:
                try:
                    job = self._queue.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                elif job.cancelled.is_set():
                    log.info("tunex serve: a job was cancelled before it started (its client went away)")
                else:
                    seq = self._begin(job)
                    if seq is not None:
                        running.append(seq)
                self._running = len(running)
            # decode until a queued job can join
            with decode_threads(device), registry.pinned():
                while running and (stopping or len(running) >= self.max_batch or self._queue.empty()):
                    running = self._step(running)
                    self._running = len(running)

    def _begin(self, job: Job) -> _Sequence | None:
        """``job``'s prompt pass (or the copy of an earlier one of the same prompt); None when it
        failed."""
        try:
            seq = _Sequence(self, job)
            size = len(job.prompt_ids) + job.max_tokens
            cache = self.model.new_cache(1, size)
            seq.cache = cache
            key = self.prompts.key(job.adapter, job.prompt_ids, size)
            logits = self.prompts.restore(key, cache)
            if logits is None:
                self.bank.use(job.adapter)
                ids = torch.as_tensor(job.prompt_ids, dtype=torch.long, device=seq.seen.device)
                logits = self.model(ids[None], cache=cache, last_only=True)[0, -1]
                self.prompts.store(key, cache, logits)
            seq.logits = logits.float()
            return seq
        except Exception as exc:
            log.exception("tunex serve: a job failed")
            job.emit("error", exc)
            return None

    def _step(self, running: list[_Sequence]) -> list[_Sequence]:
        """One token for every running job: choose it from the job's logits, then one forward per
        adapter for the jobs that go on. Returns the jobs still running."""
        from tunex.kernels.gemv import token_rows
        from tunex.models.decoder import RowCaches

        going: dict[str | None, list[tuple[_Sequence, torch.Tensor]]] = {}
        for seq in running:
            token = seq.next_token()
            if token is not None:
                going.setdefault(seq.job.adapter, []).append((seq, token))
        left = []
        for adapter, group in going.items():
            singles = adapter is not None and not self._adapter_rows_exact(adapter)
            batches = [[item] for item in group] if singles else [group]
            for batch in batches:
                seqs = [seq for seq, _ in batch]
                try:
                    self.bank.use(adapter)
                    if len(batch) == 1:  # generate's own call
                        seq, token = batch[0]
                        logits = self.model(token.view(1, 1), cache=seq.cache, last_only=True)[:, -1]
                    else:
                        self.most_rows = max(self.most_rows, len(batch))
                        tokens = torch.stack([token for _, token in batch]).view(-1, 1)
                        with token_rows():
                            caches = RowCaches([seq.cache for seq in seqs])
                            logits = self.model(tokens, cache=caches, last_only=True)[:, -1]
                except Exception as exc:  # the forward of these jobs failed: each gets the error
                    log.exception("tunex serve: a decode step failed")
                    for seq in seqs:
                        seq.job.emit("error", exc)
                    continue
                for i, seq in enumerate(seqs):
                    seq.logits = logits[i].float()
                left.extend(seqs)
        order = {id(seq): i for i, seq in enumerate(running)}
        return sorted(left, key=lambda seq: order[id(seq)])

    def _adapter_rows_exact(self, adapter: str) -> bool:
        """Whether ``adapter``'s layers decode several rows exactly as one (the registry's
        one-row GEMV path of LoRALinear: a dense base, no DoRA, eval mode)."""
        from tunex.peft import LoRALinear

        known = self.__dict__.setdefault("_rows_exact", {})
        if adapter not in known:
            known[adapter] = all(
                type(layer) is LoRALinear
                and layer.base_layer is None
                and layer.lora_magnitude_vector is None
                and not layer.training
                and _widths_ok(layer.out_features)
                for layer in self.bank.layers[adapter].values()
            )
        return known[adapter]

    def run(self, job: Job) -> JobResult:
        """Run ``job`` alone on the calling thread (the one-at-a-time worker calls this)."""
        reply = _Reply(self, job)
        try:
            self.generate_ids(job, reply.stop_ids, reply.push)
        except _Stopped:
            pass
        except _Cancelled:
            log.info("tunex serve: a job was cancelled after %d tokens (its client went away)", len(reply.out))
            raise
        return reply.result()

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


class _Reply:
    """A job's reply as its tokens come: the text is emitted once it cannot turn into a stop string."""

    def __init__(self, engine: Engine, job: Job):
        from tunex.models.generate import stop_settings

        self.job, self.tokenizer = job, engine.tokenizer
        words = list(job.stop) + (list(engine.template.stop_words) if job.chat else [])
        self.stop_ids, self.stops = stop_settings(engine.tokenizer, words, engine.eos_ids)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.out: list[int] = []
        self.sent, self.text, self.stopped = 0, "", False

    def push(self, token: int) -> None:
        """Take the next token; raises _Cancelled (the client went away) or _Stopped (a stop string)."""
        if self.job.cancelled.is_set():
            raise _Cancelled
        self.out.append(token)
        text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is still being spelled out
            return
        cut = _first_stop(text, self.stops, max(0, self.sent - self.hold))
        if cut is not None:
            text = text[:cut]
        safe = len(text) if cut is not None else len(text) - self.hold
        if safe > self.sent:
            self.job.emit("text", text[self.sent : safe])
            self.sent = safe
        self.text = text
        if cut is not None:
            self.stopped = True
            raise _Stopped

    def result(self) -> JobResult:
        """The finished reply (the text still held back emitted first)."""
        if not self.stopped:
            text = self.tokenizer.decode(self.out, skip_special_tokens=True)
            cut = _first_stop(text, self.stops, 0)
            self.text = text if cut is None else text[:cut]
            if len(self.text) > self.sent:
                self.job.emit("text", self.text[self.sent :])
        finish = "stop" if self.stopped or len(self.out) < self.job.max_tokens else "length"
        return JobResult(self.text, len(self.job.prompt_ids), len(self.out), finish)


class _Sequence:
    """A running job of the batched worker: its KV cache, its next-token logits, its sampler, and
    the token-by-token loop of tunex.models.generate.generate, one step at a time."""

    def __init__(self, engine: Engine, job: Job):
        from tunex.models.generate import GenerationConfig

        self.job = job
        self.reply = _Reply(engine, job)
        self.config = GenerationConfig(
            max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, seed=job.seed
        )
        self.config.check()
        device = next(engine.model.parameters()).device
        self.generator = None
        if self.config.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        self.stop_ids = set(self.reply.stop_ids)
        self.seen = torch.as_tensor(job.prompt_ids, dtype=torch.long, device=device)
        self.cache = None
        self.logits: torch.Tensor | None = None

    def next_token(self) -> torch.Tensor | None:
        """The next token from the logits, emitted; None when the job is over (its result or error
        emitted, or it was cancelled)."""
        from tunex.models.generate import process_logits

        job = self.job
        try:
            scores = process_logits(self.logits.clone(), self.seen, self.config)
            if self.config.temperature == 0:
                token = scores.argmax()
            else:
                token = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[0]
            t = int(token)
            if t not in self.stop_ids:
                self.reply.push(t)
                if len(self.reply.out) < job.max_tokens:
                    self.seen = torch.cat((self.seen, token.view(1)))
                    return token
        except _Stopped:
            pass
        except _Cancelled:
            log.info("tunex serve: a job was cancelled after %d tokens (its client went away)", len(self.reply.out))
            return None
        except Exception as exc:  # a request never takes the server down
            log.exception("tunex serve: a job failed")
            job.emit("error", exc)
            return None
        try:
            result = self.reply.result()
        except Exception as exc:
            log.exception("tunex serve: a job failed")
            job.emit("error", exc)
            return None
        job.emit("done", result)
        return None


def _widths_ok(*widths: int) -> bool:
    """Whether rows of these widths start on a fresh vector of torch's element-wise CPU loops
    (which finish a tensor's tail with scalar code): then every element takes the same path in a
    batch as alone. 32 floats covers AVX2's and AVX-512's unrolled pairs of vectors."""
    return all(w % 32 == 0 for w in widths)


def _why_not_batched(model) -> str | None:
    """Why ``model``'s jobs cannot be decoded together bit-exactly (None: they can)."""
    from tunex.kernels import gemv
    from tunex.models.decoder import MLP, Attention, CausalLM, DecoderLayer, DecoderModel, RMSNorm

    if type(model) is not CausalLM or type(model.model) is not DecoderModel:
        return f"{type(model).__name__} is not the llama-family decoder"
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"batched decoding is exact on the CPU in float32 only (the model is {p.dtype} on {p.device.type})"
    if not (gemv.enabled() and gemv.rows_supported()):
        return "the Rust GEMV is off (TUNEX_GEMV=0) or the built extension lacks gemv_rows_f32"
    known = (CausalLM, DecoderModel, DecoderLayer, Attention, MLP, RMSNorm, nn.Linear, nn.Embedding, nn.ModuleList)
    other = sorted({type(m).__name__ for m in model.modules() if type(m) not in known})
    if other:
        return f"layers other than the plain decoder's ({', '.join(other)})"
    cfg = model.config
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
    if not _widths_ok(*widths):
        return f"widths {widths} are not all multiples of 32"
    return None


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
