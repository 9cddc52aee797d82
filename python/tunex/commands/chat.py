"""``tunex chat MODEL``: talk to a model in the terminal, or answer ``--prompt`` texts and exit."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(chat)


HELP_LINE = "(type EXIT to quit, RESET to start a new conversation; an empty line is ignored)"


@click.command()
@click.argument("model")
@click.option(
    "--adapter",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="PEFT LoRA adapter folder, applied unmerged on top of MODEL.",
)
@click.option(
    "--bits",
    type=click.Choice(["4", "16", "32"]),
    default=None,
    help="4 = load the decoder linears as NF4 (QLoRA base); default: the --dtype weights.",
)
@click.option(
    "--prompt-template",
    default="auto",
    show_default=True,
    help="Chat template: auto (the model's own) or a built-in name (chatml, llama3_chat, ...).",
)
@click.option("--system", default="", help="System prompt.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=2048, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.1, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=40, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.75, show_default=True)
@click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-streamer", is_flag=True, help="Print each reply when complete instead of token by token.")
@click.option(
    "--prompt", "prompts", multiple=True, help="Answer this message and exit (repeat for a multi-turn conversation)."
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="auto = bfloat16 on CUDA, float32 on CPU.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def chat(
    model: str,
    adapter: Path | None,
    bits: str | None,
    prompt_template: str,
    system: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int,
    no_streamer: bool,
    prompts: tuple[str, ...],
    dtype: str,
    device: str,
) -> None:
    """Chat with MODEL (HF folder, .gguf file, pkg://PACKAGE/FILE or a downloaded hub id)."""
    import torch

    from tunex.models import GenerationConfig, generate_text, load_model, resolve_model_path
    from tunex.models.config import check_tokenizer_fits
    from tunex.models.hf_backend import model_config
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = {"32": "float32", "16": "bfloat16"}.get(bits or "", "bfloat16" if device == "cuda" else "float32")
    quantize = None
    if bits == "4":
        from tunex.quant import NF4Linear

        def quantize(name, linear):
            return NF4Linear.from_linear(linear)

    folder = resolve_model_path(model)
    tokenizer = load_tokenizer(folder)
    check_tokenizer_fits(tokenizer, model_config(folder), folder)
    template = get_template(prompt_template, tokenizer, system=system)
    lm = load_model(folder, dtype=dtype, device=device, quantize=quantize)
    if adapter is not None:
        from tunex.models.adapter import apply_adapter

        apply_adapter(lm, adapter)
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_words=template.stop_words,
    )
    settings.check()

    messages: list[dict] = [{"role": "system", "content": system}] if system and template.builtin is None else []

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        prompt = template.render(messages, add_generation_prompt=True)
        streamer = None if no_streamer else (lambda piece: click.echo(piece, nl=False))
        reply = generate_text(lm, tokenizer, prompt, settings, streamer=streamer)
        click.echo("" if streamer else reply)
        messages.append({"role": "assistant", "content": reply})

    if prompts:
        for text in prompts:
            answer(text)
        return
    click.echo(f"tunex chat: {folder} {HELP_LINE}", err=True)
    while True:
        try:
            text = input("\n>>> ")
        except EOFError:
            click.echo("", err=True)
            return
        command = text.strip()
        if command.upper() == "EXIT":
            return
        if command.upper() == "RESET":
            del messages[1 if messages and messages[0]["role"] == "system" else 0 :]
            click.echo("(conversation cleared)", err=True)
            continue
        if command:
            answer(text)
