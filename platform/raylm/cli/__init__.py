"""The `raylm` command: one verb per stage, each taking `--config FILE` and dotted overrides (`train.lr=3e-4`).

Every verb prints exactly one JSON line on stdout (what it produced), so scripts can chain stages; progress and
Ray's own output go to stderr. Exit codes: 0 done, 1 failed (the message says why), 2 bad config or usage
(found before anything is submitted to a cluster), 130 interrupted (143 on SIGTERM).
"""

from raylm.cli import models, stages  # noqa: F401  (each registers its verbs on the app)
from raylm.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
