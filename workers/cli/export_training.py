"""``guardstream export-training``: labelled posts to RL training data."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from workers.cli.base import (
    BootstrapOpt,
    CliError,
    S3EndpointOpt,
    TaxonomyOpt,
    UsageError,
    app,
    load_settings,
    log,
    writable_dir,
)
from workers.cli.bounds import time_range
from workers.cli.render import terminal
from workers.settings import Settings

if TYPE_CHECKING:
    from training.export import TrainingExporter


class ExportFormat(StrEnum):
    TRL = "trl"
    VERL = "verl"


def training_exporter(s: Settings) -> TrainingExporter:
    from guard.prompts import PromptSet
    from guard.taxonomy import Taxonomy
    from training.export import TrainingExporter
    from workers.wiring import build_fetcher

    return TrainingExporter(
        s.kafka.bootstrap_servers,
        PromptSet(Taxonomy.load(s.engine_config.taxonomy_path)),
        build_fetcher(s),
        posts_topic=s.kafka.posts_topic,
        verdicts_topic=s.kafka.verdicts_topic,
        reviews_topic=s.kafka.reviews_topic,
        kafka_extra=s.kafka.extra,
    )


def parse_ratios_opt(text: str, ctx: typer.Context | None = None) -> dict[str, float]:
    """``--ratios``: a bad value is a usage error (exit 2), refused before any topic is read."""
    from training.export import parse_ratios

    try:
        return parse_ratios(text)
    except ValueError:
        raise UsageError(
            f"--ratios {text!r}: expected three non-negative weights text:image:text-image such as 1:1:1 "
            "(or text=2,image=1,text-image=1), not all zero",
            ctx=ctx,
        ) from None


def _fraction(value: float) -> float:
    from training.export import ExportError, check_val_fraction

    try:
        check_val_fraction(value)  # the exporter's own rule (NaN included), checked while parsing
    except ExportError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


@app.command("export-training")
def export_training(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Dataset directory to write.", file_okay=False)],
    bootstrap_servers: BootstrapOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
    taxonomy_path: TaxonomyOpt = None,
    start: Annotated[
        str | None, typer.Option("--from", help="ISO-8601 post time (inclusive).", show_default="start")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="ISO-8601 post time (inclusive).", show_default="end")
    ] = None,
    ratios: Annotated[str, typer.Option(help="Modality mix text:image:text-image.")] = "1:1:1",
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of the records held out for validation, in [0, 1).", callback=_fraction),
    ] = 0.1,
    keep_s3_refs: Annotated[
        bool, typer.Option("--keep-s3-refs", help="Do not copy images; keep s3:// refs.")
    ] = False,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="trl: JSONL for training.launch; verl: parquet.")
    ] = ExportFormat.TRL,
) -> int:
    """Export posts + verdicts + reviews to a ProGuard-style RL dataset directory."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from training.export import ExportError

    s = load_settings(
        bootstrap_servers=bootstrap_servers, s3_endpoint_url=s3_endpoint_url, taxonomy_path=taxonomy_path
    )
    lo, hi = time_range(start, end)
    mix = parse_ratios_opt(ratios, ctx)
    writable_dir(out)
    exp = training_exporter(s)
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("exporting: {task.completed} posts read"),
            console=Console(stderr=True),
        ) as prog:
            task = prog.add_task("export", total=None)
            rep = exp.export(
                out,
                start=lo,
                end=hi,
                ratios=mix,
                val_fraction=val_fraction,
                copy_images=not keep_s3_refs,
                on_progress=lambda n: prog.advance(task, n),
                fmt=fmt.value,
            )
    except ExportError as exc:  # nothing to export is a failure (exit 1), not an empty dataset
        raise CliError(str(exc)) from None
    finally:
        exp.close()
    terminal().print((out / "README.md").read_text())
    log.info("training_export_written", out=str(out), splits=dict(rep.splits))
    return 0
