"""``tunex check-custom-dataset CFG`` and ``tunex log-dataset CFG``: see what the model trains on."""

from __future__ import annotations

import json

import click

SHOW = ("text", "masked_text", "input_ids", "labels", "all")


def register(cli: click.Group, convert: click.Group) -> None:
    cli.add_command(check_custom_dataset)
    cli.add_command(log_dataset)


def _load(config: str, overrides: tuple[str, ...]):
    from tunex.config import load_config
    from tunex.tokenizer import load_tokenizer

    cfg = load_config(config, overrides)
    return cfg, load_tokenizer(cfg.model.tokenizer or cfg.model.path)


def _build(cfg, tokenizer, cache_dir: str | None):
    import sys

    from tunex.data import build_dataset

    def progress(done: int, total: int) -> None:  # on a terminal only: logs stay clean
        click.echo(f"\rtokenizing: {done}/{total} chunks", nl=done == total, err=True)

    shown = progress if sys.stderr.isatty() else None
    return build_dataset(cfg.data, tokenizer, seed=cfg.train.seed, cache_dir=cache_dir or None, progress=shown)


def _section(title: str, body: str) -> None:
    click.echo(click.style(f"== {title} ==", bold=True))
    click.echo(body)
    click.echo()


_OPTIONS = [
    click.argument("config"),
    click.option(
        "-o",
        "--cfg-options",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key, e.g. -o data.max_length=512 (repeatable).",
    ),
    click.option(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="Reuse/write the tokenized cache here (default: a temporary folder).",
    ),
]


def _with_options(f):
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


@click.command("check-custom-dataset")
@_with_options
def check_custom_dataset(config: str, overrides: tuple[str, ...], cache_dir: str | None) -> None:
    """Validate every record of CONFIG's data and show one sample at each stage, then totals.

    \b
    CONFIG is a .toml file or a built-in config name. Stages: the raw record, the record mapped to a
    conversation, the rendered template ([[ ]] marks what is trained on), token ids with labels,
    and the first packed sequence. A malformed record stops the check with its file and line.
    """
    from tunex.data.preview import first_stages, marked_text, sample_text, totals_table

    cfg, tokenizer = _load(config, overrides)
    data = cfg.data
    if getattr(cfg, "vision", None) is not None and cfg.vision.path:
        _check_image_dataset(cfg, tokenizer)
        return
    click.echo(
        f"data: {data.path}  format: {data.format}  template: "
        f"{'-' if data.format == 'pretrain' else data.template}  max_length: {data.max_length}\n"
    )
    stages = first_stages(data, tokenizer)
    ds = _build(cfg, tokenizer, cache_dir)  # reads, maps and encodes every record
    if stages is not None:
        _section(f"1. raw record ({stages.where})", json.dumps(stages.raw, ensure_ascii=False, indent=1))
        _section(f"2. after format mapping ({data.format})", sample_text(stages.sample))
        if stages.rendered is not None:
            _section("3. after the template ([[target]])", marked_text(stages.rendered, stages.spans))
        else:
            _section(
                "3. no template (pretraining: every token is a target, EOS ends each document)",
                tokenizer.decode(stages.ids.tolist()),
            )
        labels = [int(i) if m else -100 for i, m in zip(stages.ids.tolist(), stages.mask.tolist())]
        _section(
            f"4. token ids ({len(labels)} tokens, {sum(stages.mask.tolist())} targets)",
            f"input_ids: {stages.ids.tolist()}\nlabels:    {labels}",
        )
    first = ds.arrays(0)
    ids, pos = first[0], first[2]
    bounds = [int(i) for i in (pos == 0).nonzero()[0]] + [len(ids)]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    kind = "packed sequence" if ds.packed else "sequence (packing off)"
    _section(f"5. first {kind}: {len(ids)} tokens, samples of {lengths} tokens", f"position_ids: {pos.tolist()}")
    rows = totals_table(ds.stats, data.max_length)
    width = max(len(k) for k, _ in rows)
    _section("totals", "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    click.echo(click.style("every record is valid", fg="green"))


@click.command("log-dataset")
@_with_options
@click.option("--show", type=click.Choice(SHOW), default="all", show_default=True, help="What to print of each item.")
@click.option("-n", "--num", type=int, default=1, show_default=True, help="Items to print.")
@click.option("--start", type=int, default=0, show_default=True, help="Index of the first item.")
def log_dataset(
    config: str, overrides: tuple[str, ...], cache_dir: str | None, show: str, num: int, start: int
) -> None:
    """Print training items of CONFIG exactly as the model receives them.

    \b
    text         the decoded input_ids
    masked_text  the decoded targets, each run of untrained tokens shown as [-100 xN]
    input_ids    token ids
    labels       label ids (-100 = not trained on)
    """
    from tunex.data.preview import masked_text

    if num < 1 or start < 0:
        raise click.BadParameter("--num must be >= 1 and --start >= 0")
    cfg, tokenizer = _load(config, overrides)
    image_id = None
    if getattr(cfg, "vision", None) is not None and cfg.vision.path:  # LLaVA data: images checked, in memory
        from tunex.train.multimodal import build_image_dataset, image_token_layout

        ds, image_id = build_image_dataset(cfg, tokenizer), image_token_layout(cfg, tokenizer)[0]
    else:
        ds = _build(cfg, tokenizer, cache_dir)
    if start >= len(ds):
        raise click.BadParameter(f"--start {start}: the dataset has {len(ds)} items", param_hint="--start")
    for index in range(start, min(start + num, len(ds))):
        ids, labels, _ = ds.arrays(index)
        click.echo(click.style(f"== item {index} of {len(ds)} ({len(ids)} tokens) ==", bold=True))
        if image_id is not None:  # image positions as spans, targets in [[ ]]
            from tunex.data.multimodal import image_text

            if show in ("text", "all"):
                _section("text", image_text(tokenizer, ids, image_id))
            if show in ("masked_text", "all"):
                _section("masked_text ([[target]])", image_text(tokenizer, ids, image_id, labels))
            _section("images", "\n".join(ds.images(index)))
        elif show in ("text", "all"):
            _section("text", tokenizer.decode(ids.tolist()))
        if image_id is None and show in ("masked_text", "all"):
            _section("masked_text", masked_text(tokenizer, ids, labels))
        if show in ("input_ids", "all"):
            _section("input_ids", str(ids.tolist()))
        if show in ("labels", "all"):
            _section("labels", str(labels.tolist()))


def _check_image_dataset(cfg, tokenizer) -> None:
    """check-custom-dataset of a [vision] config: every record and image checked, the first sample
    with its image token spans, totals."""
    from tunex.data.multimodal import image_spans, image_text
    from tunex.train.multimodal import build_image_dataset, image_token_layout

    data = cfg.data
    image_id, per_image = image_token_layout(cfg, tokenizer)
    click.echo(
        f"data: {data.path}  format: {data.format}  template: {data.template}  max_length: {data.max_length}\n"
        f"images: {data.image_folder or '(next to the data files)'}  {per_image} tokens per image "
        f"(token id {image_id})\n"
    )
    ds = build_image_dataset(cfg, tokenizer)  # reads, checks (decodes every image) and encodes every record
    sample = ds.data.samples[0]
    _section("1. first sample ([[target]])", image_text(tokenizer, sample.ids, image_id, sample.labels))
    spans = image_spans(sample.ids, image_id)
    _section(
        f"2. image token spans ({len(spans)}; labels -100 there)",
        "\n".join(f"{a}..{b}  {path}" for (a, b), path in zip(spans, sample.images)) or "(text only)",
    )
    ids, _, pos = ds.arrays(0)
    bounds = [int(i) for i in (pos == 0).nonzero()[0]] + [len(ids)]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    kind = "packed sequence" if ds.packed else "sequence (packing off)"
    _section(f"3. first {kind}: {len(ids)} tokens, samples of {lengths} tokens", f"images: {len(ds.images(0))}")
    stats = ds.stats
    rows = [(k, str(stats[k])) for k in ("records", "samples", "images", "bad_images", "dropped", "tokens")]
    rows += [("target tokens", str(stats["target_tokens"])), ("sequences", str(stats["sequences"]))]
    width = max(len(k) for k, _ in rows)
    _section("totals", "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    click.echo(click.style("every record is valid", fg="green"))
