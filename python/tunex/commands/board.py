"""``tunex board WORK_DIR``: serve the live run page (tunex.board) until interrupted."""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(board)


@click.command()
@click.argument("work_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=6007, show_default=True, help="0 = any free port.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 shows the page to other machines too.",
)
@click.option(
    "--interval", type=click.FloatRange(0.2), default=2.0, show_default=True, help="Seconds between page updates."
)
def board(work_dir: Path, port: int, host: str, interval: float) -> None:
    """Serve a page with the curves, eval answers, config and checkpoints of WORK_DIR (a work dir,
    or a folder of work dirs); it follows runs while they train."""
    from tunex.board.runs import find_runs
    from tunex.board.server import make_server

    try:
        server = make_server(work_dir, host, port, interval)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    runs = find_runs(work_dir)
    shown = f"{len(runs)} run(s)" if runs else "no run yet (the page picks them up as they start)"
    click.echo(f"tunex board: {work_dir}, {shown} at http://{host}:{server.server_port}/ (Ctrl+C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
