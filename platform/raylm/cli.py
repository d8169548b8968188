"""The `raylm` command: one verb per stage, each taking `--config FILE` and dotted overrides (`train.lr=3e-4`).

Every verb prints exactly one JSON line on stdout (what it produced), so scripts can chain stages; progress and
Ray's own output go to stderr. Exit codes: 0 done, 1 failed (the message says why), 2 bad config or usage
(found before anything is submitted to a cluster), 130 interrupted (143 on SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from raylm.config import Config, ConfigError, load_config

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


def fail(message: str, code: int = 1) -> None:
    from raylm.redact import redact_text

    typer.echo(f"raylm: {redact_text(message)}", err=True)  # messages echo paths, and paths may carry tokens
    raise typer.Exit(code)


def load(config: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        fail(str(err), 2)
        raise  # unreachable: fail() exits


_summary_stream = sys.stdout


class _QuietStream:
    """stderr, minus the lines Ray prints about choices raylm makes on purpose (many small worker processes)."""

    NOISE = ("PYTHON worker processes have been started",)

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if any(pattern in text for pattern in self.NOISE):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def emit(summary: dict[str, Any]) -> None:
    """The verb's one JSON line, on the real stdout even while stage output is redirected to stderr."""
    stream = _summary_stream if isinstance(sys.stdout, _QuietStream) else sys.stdout
    stream.write(json.dumps(summary, default=str) + "\n")
    stream.flush()


def _error_kinds() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors in what the user asked for: exit 2, errors in the user's data or models: exit 1)."""
    from raylm.cluster import StorageNotShared, UnplaceableError
    from raylm.data.sources import DataError
    from raylm.models import ModelLoadError
    from raylm.registry import RegistryError
    from raylm.runs import StageConflict
    from raylm.serving.server import ServeConfigError
    from raylm.train.trainer import TrainingFailed
    from raylm.tune_results import SweepFailed

    config_errors = (ConfigError, StageConflict, ServeConfigError, UnplaceableError, StorageNotShared)
    return config_errors, (DataError, ModelLoadError, RegistryError, FileNotFoundError, TrainingFailed, SweepFailed)


def _user_error_inside(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """Ray wraps exceptions raised in tasks and workers; find the user's own error in the chain, or, where the chain
    did not survive the trip from the worker, in the worker's traceback text."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        current = current.__cause__ or current.__context__ or getattr(current, "cause", None)
    text = str(err)
    for kind in kinds:
        match = re.search(rf"^{re.escape(kind.__module__)}\.{kind.__qualname__}: (.+)$", text, re.MULTILINE)
        if match:
            return kind(match.group(1))
    return None


def run_stage(
    cfg: Config,
    address: str | None,
    verbose: bool,
    body: Callable[..., dict[str, Any]],
    preflight: Callable[[], None] | None = None,
    needs_ray: bool = True,
) -> dict[str, Any]:
    """Run one stage with stdout kept clean, turning known failures into one-line messages and exit codes."""
    global _summary_stream
    from raylm.tune_results import SweepInterrupted

    config_errors, user_errors = _error_kinds()
    _summary_stream = sys.stdout

    terminated = threading.Event()
    try:
        if preflight:
            preflight()
        with contextlib.redirect_stdout(_QuietStream(sys.stderr)):
            if not needs_ray:
                _stop_gracefully_on_sigterm(terminated)
                return body(cfg)
            from raylm.cluster import ray_session

            with ray_session(cfg, address, verbose) as plan:
                _stop_gracefully_on_sigterm(terminated)  # after ray.init, which installs its own handler
                return body(cfg, plan)
    except config_errors as err:
        fail(str(err), 2)
    except (KeyboardInterrupt, SweepInterrupted):
        code = 143 if terminated.is_set() else 130
        fail("interrupted: stopped the stage and what it started; run the same command again to resume", code)
    except Exception as err:
        cause = _user_error_inside(err, config_errors + user_errors)
        if cause is not None:
            fail(str(cause), 2 if isinstance(cause, config_errors) else 1)
        if verbose:
            raise
        # A failure inside Ray (a worker, a trial): its message, without pages of driver-side stack.
        fail(f"{type(err).__name__}: {err}\n(run again with --verbose for Ray's logs and the full traceback)", 1)
    raise AssertionError("unreachable")


def _stop_gracefully_on_sigterm(terminated: threading.Event) -> None:
    """SIGTERM (`ray job stop`, `kill`, a scheduler's preemption) takes the Ctrl-C path: stop what the stage
    started and exit 143, leaving the run to resume from its last checkpoint. Only the first one interrupts: a
    second while stopping is ignored, so cleanup is not cut short."""

    def handler(signum, frame) -> None:
        if terminated.is_set():
            return
        terminated.set()
        # Whatever handles Ctrl-C now handles this: Python's KeyboardInterrupt, or, during a sweep, Ray Tune's
        # handler, which stops the trials and saves the sweep's state so that it can resume. A process started
        # with SIGINT ignored (`raylm serve ... &` in a script) has nothing there: raising SIGINT would be lost.
        if callable(signal.getsignal(signal.SIGINT)):
            signal.raise_signal(signal.SIGINT)
        else:
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def run_resumable_stage(
    stage: str,
    runner: Callable[..., dict[str, Any]],
    config: Path | None,
    overrides: list[str] | None,
    address: str | None,
    restart: bool,
    verbose: bool,
) -> None:
    """A stage that follows the run.name rule: refuse a changed config before connecting, then run and report."""
    cfg = load(config, overrides)
    emit(run_stage(cfg, address, verbose, runner, _preflight(cfg, (stage,), restart)))


def _preflight(cfg: Config, stages: tuple[str, ...], restart: bool) -> Callable[[], None]:
    def check() -> None:
        from raylm.runs import check_run_dir_writable, check_stages

        check_run_dir_writable(cfg)
        check_stages(cfg, stages, restart)

    return check


@app.command()
def prepare(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    restart: RestartOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Read the corpus, train or load a tokenizer, write tokenized Parquet shards and their manifest."""
    from raylm.data.prepare import run_prepare

    run_resumable_stage(
        "prepare",
        lambda cfg, plan: run_prepare(cfg, restart, plan.tokenize_actors),
        config,
        overrides,
        address,
        restart,
        verbose,
    )


@app.command()
def train(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    restart: RestartOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Data-parallel training on the shards with Ray Train; resumes a run.name that did not finish."""
    from raylm.train.trainer import run_train

    run_resumable_stage(
        "train", lambda cfg, plan: run_train(cfg, plan, restart), config, overrides, address, restart, verbose
    )


@app.command()
def tune(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    restart: RestartOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Sweep train.* fields with Ray Tune (ASHA); the best trial by validation loss is recorded."""
    from raylm.tune import run_tune

    run_resumable_stage(
        "tune", lambda cfg, plan: run_tune(cfg, plan, restart), config, overrides, address, restart, verbose
    )


@app.command()
def register(
    config: ConfigOption = None,
    overrides: Overrides = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="A checkpoint directory (default: the best trial, else the trained run).")
    ] = None,
) -> None:
    """Copy the best checkpoint into the model registry as a new version, with its lineage; the eval gate decides
    whether it becomes `<name>:best` (a model that fails is registered but not promoted, and told why)."""
    from raylm.registry import run_register

    cfg = load(config, overrides)
    emit(
        run_stage(cfg, None, False, lambda c: run_register(c, checkpoint), _preflight(cfg, (), False), needs_ray=False)
    )


@app.command()
def serve(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Serve a registered model over HTTP (OpenAI-compatible) until Ctrl-C."""
    from raylm.serving.server import start_serving, stop_serving

    cfg = load(config, overrides)

    def body(c: Config, plan) -> dict[str, Any]:
        emit(start_serving(c, plan))
        try:
            while True:
                time.sleep(3600)
        finally:
            with contextlib.suppress(Exception):
                stop_serving()

    run_stage(cfg, address, verbose, body)


@app.command()
def doctor(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Check versions, the cluster's resources against the config, run.dir (writable, shared by every node), Ray's
    auth mode and the size of a job upload; exit 1 if any check fails."""
    from raylm.doctor import run_doctor

    cfg = load(config, overrides)
    summary = run_stage(cfg, address, verbose, run_doctor)
    emit(summary)
    if not summary["ok"]:
        fail("doctor: " + "; ".join(f"{c['check']}: {c['reason']}" for c in summary["checks"] if c["status"] == "fail"))


@app.command()
def submit(
    stage: Annotated[str, typer.Argument(help="prepare, train, tune or pipeline.")],
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="YAML config, as a path inside the working directory.")
    ] = None,
    overrides: Overrides = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="The cluster's dashboard, http://HOST:8265 (default: RAY_ADDRESS)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to end, print its logs, exit 1 if it failed.")] = False,
    python: Annotated[str, typer.Option(help="The cluster's Python interpreter, for the job's command.")] = "python",
) -> None:
    """Run a stage as a Ray job on a cluster, shipping this checkout (not .git, .venv, runs, data) with it."""
    from raylm.submit import ClusterUnreachable, SubmitError
    from raylm.submit import submit as submit_job
    from raylm.submit import wait as wait_for

    load(Path(config) if config else None, overrides)  # the schema, here, before anything is uploaded (exit 2)
    try:
        summary = submit_job(address, stage, config, overrides or [], Path.cwd(), python)
    except SubmitError as err:
        fail(str(err), 2)
    except ClusterUnreachable as err:
        fail(str(err), 1)
    emit(summary)
    if wait:
        try:
            ended = wait_for(address, summary["job_id"])
        except ClusterUnreachable as err:
            fail(str(err), 1)
        typer.echo(ended["logs"], err=True)
        if ended["status"] != "SUCCEEDED":
            fail(f"job {summary['job_id']} {ended['status']}")


@app.command()
def pipeline(
    config: ConfigOption = None,
    overrides: Overrides = None,
    address: AddressOption = None,
    restart: RestartOption = False,
    verbose: VerboseOption = False,
    ask: Annotated[
        str | None, typer.Option(help="Send this prompt to the served model, print the answer, and stop.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate for --ask.")] = 48,
) -> None:
    """prepare -> tune (or train when tune.enabled is false) -> register -> serve, from one config."""
    from raylm.pipeline import run_pipeline
    from raylm.serving.server import stop_serving

    cfg = load(config, overrides)
    stages = ("prepare", "tune" if cfg.tune.enabled else "train")

    def body(c: Config, plan) -> dict[str, Any]:
        summary = run_pipeline(c, plan, restart, ask, max_tokens)
        if ask is not None:
            return summary
        emit(summary)
        try:
            while True:
                time.sleep(3600)
        finally:
            with contextlib.suppress(Exception):
                stop_serving()

    emit(run_stage(cfg, address, verbose, body, _preflight(cfg, stages, restart)))


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint directory (local path or URI).")],
    out_dir: Annotated[str, typer.Argument(help="Where to write the Hugging Face model directory.")],
) -> None:
    """Write a checkpoint as a plain Hugging Face model directory (safetensors, config, tokenizer)."""
    from raylm.train.checkpoint import export_checkpoint

    try:
        target = export_checkpoint(checkpoint, out_dir)
    except ValueError as err:
        fail(str(err), 1)
    except OSError as err:  # an unwritable or unreadable path, on any filesystem
        fail(f"cannot export {checkpoint} to {out_dir}: {err.strerror or err}", 1)
    emit({"stage": "export", "checkpoint": checkpoint, "model_dir": str(target)})


@models_app.command("list")
def models_list(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Registered models: versions and aliases (latest, best with its validation perplexity)."""
    from raylm.progress import say
    from raylm.registry import RegistryError, describe_models
    from raylm.runs import RunPaths

    cfg = load(config, overrides)
    registry = RunPaths.of(cfg).registry
    try:
        models = describe_models(registry)
    except RegistryError as err:
        fail(str(err), 1)
    for name, info in models.items():
        best = "none promoted" if info["best"] is None else f"{name}:{info['best']}"
        if info["best_val_ppl"] is not None:
            best += f" (val_ppl {info['best_val_ppl']:.4g})"
        say(f"{name}: versions {info['versions']}, latest {name}:{info['latest']}, best {best}")
    emit({"registry": str(registry), "models": models})


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="name, name:latest, name:best or name:VERSION")],
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """One registered version's manifest (lineage, metrics, eval gate) and the aliases that point at it."""
    from raylm.registry import RegistryError, resolve, version_aliases
    from raylm.runs import RunPaths

    cfg = load(config, overrides)
    registry = RunPaths.of(cfg).registry
    try:
        found = resolve(registry, ref)
        aliases = version_aliases(registry, found.name, found.version)
    except RegistryError as err:
        fail(str(err), 1)
    emit({"model": found.ref, "path": str(found.path), "aliases": aliases, **found.manifest})


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="name:VERSION to make name:best, past the eval gate")],
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Point `name:best` at a version by hand (recorded as "promoted by hand")."""
    from raylm.progress import say
    from raylm.registry import BY_HAND, RegistryError, promote
    from raylm.runs import RunPaths

    cfg = load(config, overrides)
    try:
        found, previous = promote(RunPaths.of(cfg).registry, ref)
    except RegistryError as err:
        fail(str(err), 1)
    before = "none" if previous is None else f"{found.name}:{previous}"
    say(f"{found.name}:best is now {found.ref} (was {before}), {BY_HAND}")
    emit({"model": found.ref, "alias": f"{found.name}:best", "previous": previous, "reason": BY_HAND})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
