"""The `raylm` command's Typer apps and the options every verb shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="From a text corpus to a served language model on Ray: prepare, train, tune, register, serve.",
)
models_app = typer.Typer(no_args_is_help=True, help="List, inspect and promote registered models.")
app.add_typer(models_app, name="models")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see jobs/configs/).")]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides such as train.lr=3e-4.", show_default=False)
]
AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster to connect to (default: RAY_ADDRESS, else an embedded one)."),
]
RestartOption = Annotated[
    bool, typer.Option("--restart", help="Discard this run.name's earlier results and start over.")
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs and worker output.")]
