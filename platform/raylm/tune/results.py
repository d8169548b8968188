"""A sweep's results: one row per trial (its parameters, how far it got, its validation loss, its status), saved as
`results.csv` and `results.json`, printed as a table, and drawn as `results.png` (every trial's validation curve
against tokens seen, the best highlighted; final loss against the learning rate)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from raylm.errors import RunError
from raylm.storage import Location
from raylm.train.observe import LOGS_DIR, read_metrics, save_figure

RESULTS_CSV, RESULTS_JSON, RESULTS_PNG = "results.csv", "results.json", "results.png"


class SweepFailed(RunError):
    """No trial of the sweep finished (defined here, away from Ray imports, for the CLI's error mapping)."""


class SweepInterrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the sweep; Tune saved its state and the same command resumes it. Not a
    KeyboardInterrupt: the signal was handled, and a caller (a test, a notebook) should see an ordinary error."""


COLUMNS = ("trial_id", "steps", "tokens_seen", "val_loss", "val_ppl", "status", "seconds")


def trial_rows(grid, params: list[str], budget_tokens: int, tune_dir: Location) -> list[dict[str, Any]]:
    """One row per trial of a Tune `ResultGrid`. Status: `done` (whole budget), `stopped` (ASHA stopped it early),
    `error` (it raised: the first line of its error is kept)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        tokens = metrics.get("tokens_seen")
        finished = tokens is not None and tokens >= budget_tokens
        status = "error" if result.error else "done" if finished else "stopped"
        rows.append(
            {
                "trial_id": trial_id,
                **{key: result.config.get(key) for key in params},
                "steps": metrics.get("step"),
                "tokens_seen": tokens,
                "val_loss": metrics.get("val_loss"),
                "val_ppl": metrics.get("val_ppl"),
                "status": status,
                "error": _first_line(result.error) if result.error else None,
                # Tune's running total of the trial's time, up to its last report.
                "seconds": round(metrics["time_total_s"], 2) if "time_total_s" in metrics else None,
                # Ray reports the path inside the storage filesystem; as a URI it names the filesystem too.
                "checkpoint": str(Location(tune_dir.fs, metrics["checkpoint_path"], tune_dir.scheme))
                if metrics.get("checkpoint_path")
                else None,
                "curve": validation_curve(tune_dir / "trials" / trial_id / LOGS_DIR),
            }
        )
    return rows


def validation_curve(logs: Location) -> list[dict[str, float]]:
    """A trial's validation points from its own metrics log (which, unlike Tune's per-attempt results, spans a
    trial resumed after an interruption): tokens seen, loss, and the wall-clock time of each."""
    return [
        {"tokens_seen": r["tokens_seen"], "val_loss": r["val_loss"], "time": r["time"]}
        for r in read_metrics(logs)
        if "val_loss" in r
    ]


def _first_line(error: BaseException) -> str:
    """The user-facing line of a trial's error (Ray wraps a worker's exception in pages of traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if ": " in line and not line.startswith(("File ", "Traceback", "^")):
            return line[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


def write_results(rows: list[dict[str, Any]], summary: dict[str, Any], directory: Location) -> None:
    params = list(summary["best_config"])
    fields = ["trial_id", *params, *COLUMNS[1:], "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (directory / RESULTS_CSV).write_text(text.getvalue())
    (directory / RESULTS_JSON).write_text(
        json.dumps({"best_trial": summary["best_trial"], "trials": rows}, indent=2, default=str)
    )
    plot_results(rows, summary, directory / RESULTS_PNG)


def show_results(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from raylm.progress import console

    params = list(summary["best_config"])
    table = Table(title=f"sweep: best trial {summary['best_trial']}", title_justify="left")
    for name in ("trial", *params, "steps", "tokens", "val loss", "ppl", "status"):
        table.add_column(name, justify="left" if name in ("trial", "status") else "right")
    for row in sorted(rows, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0)):
        best = row["trial_id"] == summary["best_trial"]
        table.add_row(
            row["trial_id"],
            *(_number(row[key]) for key in params),
            _number(row["steps"]),
            _number(row["tokens_seen"]),
            _number(row["val_loss"], ".4f"),
            _number(row["val_ppl"], ".2f"),
            escape(row["status"] + (f": {row['error']}" if row["error"] else "")),  # "[/data/x]" is not markup
            style="bold green" if best else None,
        )
    console.print(table)


def _number(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        from rich.markup import escape

        return escape(str(value))  # a swept string value is shown as written, not read as markup
    if isinstance(value, float) and not spec:
        return f"{value:.3g}"
    return format(value, spec or ",")


def plot_results(rows: list[dict[str, Any]], summary: dict[str, Any], target: Location) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, (curves, by_lr) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for row in rows:
        if not row["curve"]:
            continue
        best = row["trial_id"] == summary["best_trial"]
        tokens = [point["tokens_seen"] for point in row["curve"]]
        losses = [point["val_loss"] for point in row["curve"]]
        style = {"linewidth": 2.5, "color": "C3", "zorder": 3} if best else {"linewidth": 1, "alpha": 0.6}
        curves.plot(tokens, losses, "o-", markersize=3, label=f"{row['trial_id']} (best)" if best else None, **style)
    curves.set_xlabel("tokens seen")
    curves.set_ylabel("validation loss (nats/token)")
    curves.set_title("validation loss per trial")
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend()

    x_key = "train.lr" if "train.lr" in summary["best_config"] else next(iter(summary["best_config"]))
    finished = [r for r in rows if r["val_loss"] is not None and isinstance(r.get(x_key), int | float)]
    for status, marker in (("done", "o"), ("stopped", "x")):
        points = [(r[x_key], r["val_loss"]) for r in finished if r["status"] == status]
        if points:
            by_lr.scatter(*zip(*points, strict=True), marker=marker, label=status)
    best = next((r for r in finished if r["trial_id"] == summary["best_trial"]), None)
    if best:
        by_lr.scatter([best[x_key]], [best["val_loss"]], s=120, facecolors="none", edgecolors="C3", label="best")
    values = [r[x_key] for r in finished]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        by_lr.set_xscale("log")
    by_lr.set_xlabel(x_key)
    by_lr.set_ylabel("final validation loss")
    by_lr.set_title(f"final loss against {x_key}")
    by_lr.grid(alpha=0.3)
    if by_lr.get_legend_handles_labels()[0]:
        by_lr.legend()
    save_figure(fig, target)
