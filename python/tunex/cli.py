"""The ``tunex`` command line (click): XTuner's command set.

Exit codes: 0 success, 2 usage errors (click's own), 1 any other failure, reported as one line
``error: ...`` on stderr. ``TUNEX_DEBUG=1`` shows the Python traceback instead.

Command modules import torch and friends inside their functions, so ``tunex --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tunex import __version__, builtin_configs


class TunexGroup(click.Group):
    """A click group that turns tunex's failures into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's one reporting boundary
            if _debug():
                raise
            message = str(exc) or type(exc).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(1)


def _debug() -> bool:
    """TUNEX_DEBUG=1; a bad value of it must not hide the error being reported."""
    from tunex import settings

    try:
        return settings.on("TUNEX_DEBUG")
    except Exception:  # noqa: BLE001 - SettingError: report the original error in one line
        return False


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=TunexGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="tunex", message="%(prog)s %(version)s")
def cli() -> None:
    """tunex: fine-tune large language models (full, LoRA, QLoRA) with Rust-accelerated hot paths.

    \b
    Quick start:
      tunex list-cfg -p lora            find a built-in config
      tunex copy-cfg NAME .             copy it here to edit
      tunex train NAME_copy.toml        fine-tune
    """


@cli.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_(ctx: click.Context, command: str | None) -> None:
    """Show help for tunex or for one COMMAND."""
    group = ctx.parent.command
    if command is None:
        click.echo(group.get_help(ctx.parent))
        return
    sub = group.get_command(ctx.parent, command)
    if sub is None:
        raise click.UsageError(f"no such command {command!r}; commands: {', '.join(group.list_commands(ctx))}")
    with click.Context(sub, info_name=command, parent=ctx.parent) as sub_ctx:
        click.echo(sub.get_help(sub_ctx))


@cli.command()
def version() -> None:
    """Print the tunex version."""
    click.echo(f"tunex {__version__}")


@cli.command("list-cfg")
@click.option("-p", "--pattern", default=None, help="Case-insensitive fuzzy match on config names.")
def list_cfg(pattern: str | None) -> None:
    """List the built-in configs."""
    found, exact = builtin_configs.find(pattern)
    if not found:  # one line through TunexGroup: "error: ...", exit code 1
        raise LookupError(
            f"no built-in config name contains {pattern!r} or is spelled like it; "
            f"`tunex list-cfg` lists all {len(builtin_configs.names())}"
        )
    if not exact:
        click.echo(f"no config name contains {pattern!r}; closest names:", err=True)
    click.echo("\n".join(found))


@cli.command("copy-cfg")
@click.argument("name")
@click.argument("save_path", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def copy_cfg(name: str, save_path: Path, force: bool) -> None:
    """Copy built-in config NAME into directory SAVE_PATH (or to the file SAVE_PATH)."""
    source = builtin_configs.path_of(name)
    if save_path.is_dir() or save_path.suffix != ".toml":
        target = save_path / f"{source.stem}_copy.toml"
    else:
        target = save_path
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it")
    from tunex.io.atomic import write_bytes

    write_bytes(target, source.read_bytes())
    click.echo(f"copied {source.name} to {target}")


@cli.group(cls=TunexGroup, context_settings=CONTEXT)
def convert() -> None:
    """Convert between checkpoints and formats: merge, pth_to_hf, gguf_to_hf, hf_to_gguf."""


def _register_commands() -> None:
    """Each module in tunex/commands/ defines ``register(cli, convert)`` adding its commands.

    The modules keep heavy imports (torch, ...) inside their command functions.
    """
    import importlib
    import pkgutil

    from tunex import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"tunex.commands.{info.name}").register(cli, convert)


_register_commands()


def main() -> None:
    cli(prog_name="tunex")


if __name__ == "__main__":
    main()
