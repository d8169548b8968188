"""How a verb runs a stage: config loaded (exit 2 on a mistake), stdout kept for the one JSON line, Ray started or
reached, signals turned into a clean stop, and raylm's errors into one line and an exit code (`raylm.errors`)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from raylm.config import Config, ConfigError, load_config
from raylm.errors import UsageError, user_error
from raylm.redact import redact_text
from raylm.runs import check_run_dir_writable, check_stages


def fail(message: str, code: int = 1) -> None:

    typer.echo(f"raylm: {redact_text(message)}", err=True)  # messages echo paths, and paths may carry tokens
    raise typer.Exit(code)


def load(config: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        fail(str(err), 2)
        raise  # unreachable: fail() exits


class _QuietStream:
    """stderr, minus the lines Ray prints about choices raylm makes on purpose (many small worker processes), standing
    in for stdout while a stage runs; `summary` is the real stdout, kept for the verb's one JSON line."""

    NOISE = ("PYTHON worker processes have been started",)

    def __init__(self, stream, summary) -> None:
        self._stream, self.summary = stream, summary

    def write(self, text: str) -> int:
        if any(pattern in text for pattern in self.NOISE):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def emit(summary: dict[str, Any]) -> None:
    """The verb's one JSON line, on the real stdout even while stage output is redirected to stderr."""
    stream = sys.stdout.summary if isinstance(sys.stdout, _QuietStream) else sys.stdout
    stream.write(json.dumps(summary, default=str) + "\n")
    stream.flush()


def run_stage(
    cfg: Config,
    address: str | None,
    verbose: bool,
    body: Callable[..., dict[str, Any]],
    preflight: Callable[[], None] | None = None,
    needs_ray: bool = True,
) -> dict[str, Any]:
    """Run one stage with stdout kept clean, turning raylm's errors into one-line messages and exit codes (2: the
    user must change what they asked for; 1: the work failed), wherever they were raised (a Ray worker, a trial)."""
    from raylm.tune.results import SweepInterrupted

    terminated = threading.Event()
    try:
        if preflight:
            preflight()
        with contextlib.redirect_stdout(_QuietStream(sys.stderr, sys.stdout)):
            if not needs_ray:
                _stop_gracefully_on_sigterm(terminated)
                return body(cfg)
            from raylm.cluster import ray_session

            with ray_session(cfg, address, verbose) as plan:
                _stop_gracefully_on_sigterm(terminated)  # after ray.init, which installs its own handler
                return body(cfg, plan)
    except (KeyboardInterrupt, SweepInterrupted):
        code = 143 if terminated.is_set() else 130
        fail("interrupted: stopped the stage and what it started; run the same command again to resume", code)
    except Exception as err:
        cause = user_error(err)
        if cause is not None:
            fail(str(cause), 2 if isinstance(cause, UsageError) else 1)
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
    emit(run_stage(cfg, address, verbose, runner, preflight(cfg, (stage,), restart)))


def preflight(cfg: Config, stages: tuple[str, ...], restart: bool) -> Callable[[], None]:
    def check() -> None:

        check_run_dir_writable(cfg)
        check_stages(cfg, stages, restart)

    return check
