"""raylm's two kinds of failure. Every error a stage raises on purpose derives from one of them, and the CLI maps
them to exit codes by these two classes alone:

- `UsageError` (exit 2): what the user asked for cannot be done as asked: a config or override, a run.name that
  holds another config's results, a resource request the cluster can never place, an unsafe bind. Found before any
  cluster work where it can be.
- `RunError` (exit 1): the work failed: the user's data or models, a registry entry, training or a sweep, a cluster
  that does not answer.

Raised inside a Ray worker or a Tune trial, they reach the driver wrapped in Ray's own errors: `user_error` finds
them in the chain.
"""

from __future__ import annotations


class UsageError(ValueError):
    """The user must change what they asked for (exit 2); the message says what."""


class RunError(RuntimeError):
    """The work failed (exit 1); the message says why and how to go on."""


class ConfigError(UsageError):
    """A configuration problem; the message names the key."""


def user_error(err: BaseException) -> UsageError | RunError | None:
    """The raylm error behind `err`, itself or one that Ray wrapped (a task's `cause`, a Train worker group's
    `worker_failures`, a controller's failure, an exception's `__cause__` or `__context__`): the first `UsageError`
    in the chain if there is one (the user must change something: that is the message to show), else the first
    `RunError` (the outermost, whose message says the most: "training failed ... rank 0: ...")."""
    seen: set[int] = set()
    found: list[BaseException] = []
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UsageError | RunError):
            found.append(current)
        linked = [current.__cause__, current.__context__, getattr(current, "cause", None)]
        linked.append(getattr(current, "controller_failure", None))
        linked += list((getattr(current, "worker_failures", None) or {}).values())
        pending += [e for e in linked if isinstance(e, BaseException)]
    usage = [e for e in found if isinstance(e, UsageError)]
    return (usage or found or [None])[0]
