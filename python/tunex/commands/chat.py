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
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="An image for the first message (repeatable; MODEL must be a LLaVA folder).",
)
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
    images: tuple[Path, ...] = (),
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

    from tunex.models.llava import is_llava_folder

    folder = resolve_model_path(model)
    llava = is_llava_folder(folder)
    if images and not llava:
        raise click.UsageError(f"--image: {folder} is not a LLaVA folder (config.json model_type 'llava')")
    tokenizer = load_tokenizer(folder)
    if not llava:
        check_tokenizer_fits(tokenizer, model_config(folder), folder)
    template = get_template(prompt_template, tokenizer, system=system)
    if llava:  # tower + projector + LLM (convert pth_to_hf of a [vision] run)
        from tunex.models.llava import load_llava

        lm = load_llava(folder, dtype=dtype, device=device)
        pixels = _pixel_values(folder, images)
    else:
        from tunex.io.hf import base_config_changes

        # an adapter trained with model.rope_scaling runs on the base with that scaling, as it trained
        rope = base_config_changes(adapter).get("rope_scaling") if adapter is not None else None
        lm = load_model(folder, dtype=dtype, device=device, quantize=quantize, rope_scaling=rope)
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
    if not llava:
        pixels = None

    def answer(text: str) -> None:
        if llava and not any(m["role"] == "user" for m in messages):  # the images go with the first message
            from tunex.models.llava_generate import with_image_placeholders

            text = with_image_placeholders(text, 0 if pixels is None else int(pixels.shape[0]))
        messages.append({"role": "user", "content": text})
        prompt = template.render(messages, add_generation_prompt=True)
        streamer = None if no_streamer else (lambda piece: click.echo(piece, nl=False))
        if llava:
            from tunex.models.llava_generate import generate_llava_text

            # every turn's prompt holds the first message's images again
            reply = generate_llava_text(lm, tokenizer, prompt, pixels, settings, streamer=streamer)
        else:
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


def _pixel_values(folder: Path, images: tuple[Path, ...]):
    """The images' pixel values as the LLaVA folder's image processor makes them (None without images)."""
    if not images:
        return None
    from tunex.data.images import pixel_values
    from tunex.models.llava_generate import folder_processing

    processing, aspect = folder_processing(folder)
    return pixel_values(images, processing, aspect)
