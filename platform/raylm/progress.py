"""One clean progress display on stderr per stage (stdout is kept for the stage's one-line JSON summary)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from raylm.redact import redact_text

console = Console(stderr=True, highlight=False)
if not console.is_terminal:
    # A log (`ray job logs`, CI, a file) has no width: rich would cut every progress line at 80 columns.
    console.width = 200


@contextlib.contextmanager
def progress_bar(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """Yields `update(completed=None, info="")`: set the count done and a free-text status."""
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    if total is not None:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def update(completed: float | None = None, info: str = "") -> None:
            bar.update(task, completed=completed, info=info)

        yield update


def plain(value: object) -> str:
    """A value (a path, a prompt, generated text) shown as it is, whatever brackets it holds: `say` reads markup."""
    return escape(str(value))


def say(message: str) -> None:

    # soft_wrap: long paths stay on one line (copyable) instead of being wrapped at 80 columns in logs.
    console.print(redact_text(message), soft_wrap=True)
