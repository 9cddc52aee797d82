"""The evaluation hook (XTuner's EvaluateChatHook): answer the configured prompts with the
configured chat template every N steps and at the end, and log the answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class EvalChatHook:
    """Answers ``cfg.eval.prompts`` greedily; results go to ``work_dir/eval.jsonl`` and the console.

    Args:
        model: the model being trained (switched to eval mode while answering, then back).
        tokenizer: tunex tokenizer.
        template: a :class:`tunex.templates.ChatTemplate`.
        eval_cfg: ``cfg.eval``.
        work_dir: where eval.jsonl goes (None = do not write; non-zero ranks).
        echo: prints one line per answer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        template: Any,
        eval_cfg: Any,
        work_dir: Path | None,
        echo: Callable[[str], None],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.cfg = eval_cfg
        self.path = work_dir / "eval.jsonl" if work_dir is not None else None
        self.echo = echo

    def due(self, step: int, last_step: int) -> bool:
        every = self.cfg.every_n_steps
        return bool(self.cfg.prompts) and (step == last_step or (every > 0 and step % every == 0))

    def prompt_ids(self, prompt: str) -> list[int]:
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        messages.append({"role": "user", "content": prompt})
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for word in self.template.stop_words:
            tid = self.tokenizer.token_to_id(word)
            if tid is not None:
                ids.add(tid)
        return ids

    def __call__(self, step: int) -> list[dict[str, Any]]:
        from tunex.models import generate

        was_training = self.model.training
        self.model.eval()
        # Generation must not move the training RNG: a resumed run's dropout masks depend on it.
        rng = torch.get_rng_state()
        records = []
        try:
            stops = self.stop_ids()
            for prompt in self.cfg.prompts:
                out = generate(
                    self.model,
                    self.prompt_ids(prompt),
                    max_new_tokens=self.cfg.max_new_tokens,
                    temperature=0.0,
                    stop_token_ids=sorted(stops),
                )
                answer = self.tokenizer.decode(out, skip_special_tokens=True).strip()
                records.append({"step": step, "prompt": prompt, "answer": answer})
                self.echo(f"[eval step {step}] {prompt!r} -> {answer!r}")
        finally:
            torch.set_rng_state(rng)
            self.model.train(was_training)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return records
