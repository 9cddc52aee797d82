"""``tunex serve MODEL``: an OpenAI-compatible HTTP API, with LoRA adapters selectable per request."""

from __future__ import annotations

import click


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(serve)


def _adapter(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    from pathlib import Path

    adapters: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise click.BadParameter(f"{value!r}: expected NAME=DIR, e.g. --adapter support=work_dirs/run1/adapter")
        if name in adapters:
            raise click.BadParameter(f"{name!r} is given twice")
        if not Path(folder).is_dir():
            raise click.BadParameter(f"{folder!r} (for {name!r}) is not a folder")
        adapters[name] = folder
    return adapters


@click.command()
@click.argument("model")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    callback=_adapter,
    metavar="NAME=DIR",
    help="A PEFT LoRA adapter served as model NAME, unmerged on the shared base (repeat for more).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 = every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    default=None,
    help="Require 'Authorization: Bearer KEY' on every /v1 request (default: none, open to whoever reaches --host).",
)
@click.option("--name", default=None, help="The base model's name in requests (default: MODEL's folder or file name).")
@click.option(
    "--prompt-template",
    default="auto",
    show_default=True,
    help="Chat template: auto (the model's own) or a built-in name (chatml, llama3_chat, ...).",
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
    "--max-batch",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Most requests decoded together in one step (1: one at a time, the others queued).",
)
@click.option(
    "--prompt-cache-mb",
    type=click.IntRange(0),
    default=256,
    show_default=True,
    help="Memory for finished prompt passes: a request whose prompt (and max_tokens) was served before skips "
    "its prompt pass (0: off).",
)
def serve(
    model: str,
    adapters: dict[str, str],
    host: str,
    port: int,
    api_key: str | None,
    name: str | None,
    prompt_template: str,
    dtype: str,
    device: str,
    max_batch: int,
    prompt_cache_mb: int,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health). Requests pick the base model or an adapter by name in `model`."""
    import logging

    try:
        import uvicorn

        from tunex.serve.app import create_app
    except ImportError as exc:
        raise click.ClickException(
            f"tunex serve needs starlette and uvicorn ({exc.name} is missing): pip install 'tunex[serve]'"
        ) from None
    from tunex.serve.engine import Engine, as_device_dtype

    device, dtype = as_device_dtype(device, dtype)
    engine = Engine.load(
        model,
        adapters,
        name=name,
        prompt_template=prompt_template,
        dtype=dtype,
        device=device,
        max_batch=max_batch,
        prompt_cache_mb=prompt_cache_mb,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("tunex.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    engine.start()
    names = ", ".join(engine.models())
    click.echo(
        f"tunex serve: {names} on http://{host}:{port}/v1 ({'API key required' if api_key else 'no API key'})", err=True
    )
    try:
        uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning", access_log=False)
    finally:
        engine.stop()
