"""`raylm submit`: run a stage as a Ray job on a cluster, shipping this checkout's code with it.

The job runs `python jobs/<stage>.py [--config FILE] [key=value ...]` in a copy of the working directory (Ray's
`runtime_env.working_dir`), so cluster nodes need not have raylm installed. History, the environment and what the
platform writes (`.git`, `.venv`, `runs`, `data`) never travel, and the upload's size is checked against Ray's
limit before anything is sent. The Jobs supervisor runs an entrypoint through a shell: the command is built as an
argv list and quoted with `shlex.join`, so a value like `; touch x` or `$(...)` reaches raylm as data.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raylm.doctor import upload_size, upload_verdict
from raylm.errors import RunError, UsageError
from raylm.redact import redact_text, secret_field

JOB_SCRIPTS = {
    "prepare": "jobs/prepare_data.py",
    "train": "jobs/train.py",
    "tune": "jobs/tune.py",
    "pipeline": "jobs/pipeline.py",
}
IGNORE_FILE = ".rayignore"
"""What never travels with a job (history, the environment, what the platform writes), for `raylm submit` and a
plain `ray job submit --working-dir .` alike; `raylm doctor` counts the upload through it too. Ray applies a
.rayignore to the working dir only. (`runtime_env.excludes` would also apply to the `py_modules` a job's driver
adds, where `/data` is the code of `raylm.data`: the workers could not import it.)"""
FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UsageError):
    """The job cannot be submitted as asked (an unknown stage, credentials in an override, an upload over Ray's
    limit): exit 2."""


class ClusterUnreachable(RunError):
    """The Jobs API did not answer, or refused us (401 without Ray's token): exit 1."""


def check_overrides(overrides: list[str]) -> None:
    """Refuse credentials in override values: the job's command line sits in Ray's job table and on its dashboard
    in clear. They belong in the cluster's environment (AWS_*, a mounted key file), not in the command."""

    for item in overrides:
        key, _, value = item.partition("=")
        leaf = key.strip().rsplit(".", 1)[-1]
        if (secret_field(leaf) and value.strip()) or redact_text(value) != value:
            raise SubmitError(
                f"raylm submit: the override {key.strip()}=... carries a credential, and a job's command line is kept "
                "in clear in Ray's job table and dashboard: put credentials in the cluster's environment (AWS_* "
                "variables, a key file on the nodes) instead"
            )


def entrypoint(stage: str, config: str | None, overrides: list[str], python: str = "python") -> str:
    if stage not in JOB_SCRIPTS:
        raise SubmitError(f"raylm submit: no job for {stage!r}; stages: {', '.join(JOB_SCRIPTS)}")
    argv = [python, JOB_SCRIPTS[stage], *(["--config", config] if config else []), *overrides]
    return shlex.join(argv)


def runtime_env(directory: Path) -> dict[str, Any]:
    ignore = directory / IGNORE_FILE
    if not ignore.is_file():
        raise SubmitError(
            f"raylm submit: {ignore} is missing: it keeps the checkout's history, environment and outputs "
            "(.git, .venv, runs, data) out of the job's upload"
        )
    return {"working_dir": str(directory)}


def check_upload(directory: Path) -> int:
    """The upload's size in bytes; SubmitError when Ray would refuse it."""

    size = upload_size(directory)  # one walk of the tree: the verdict and the size reported come from it
    finding = upload_verdict(size)
    if finding.status == "fail":
        raise SubmitError(f"raylm submit: the working directory {directory} is too large to ship: {finding.reason}")
    return size


def submit(
    address: str, stage: str, config: str | None, overrides: list[str], directory: Path, python: str = "python"
) -> dict[str, Any]:
    """Submit the stage as a job; returns its id, entrypoint and upload size (the job runs on without us)."""
    from ray.job_submission import JobSubmissionClient

    command = entrypoint(stage, config, overrides, python)
    check_overrides(overrides)
    env = runtime_env(directory)  # a checkout without .rayignore is refused before its tree is walked
    size = check_upload(directory)
    with _jobs_api(address):
        job_id = JobSubmissionClient(address).submit_job(entrypoint=command, runtime_env=env)
    return {"stage": "submit", "job_id": job_id, "entrypoint": command, "upload_mib": round(size / 2**20, 2)}


@contextlib.contextmanager
def _jobs_api(address: str | None) -> Iterator[None]:
    """Ray's client errors (connection refused, 401 without the token) as one line naming the address."""
    try:
        yield
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        if "401" in str(err) or "nauthorized" in str(err) or "token" in str(err).lower():
            reason += (
                " (Ray's token authentication: raylm reads RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token;"
                " `ray get-auth-token` on the head prints it)"
            )
        where = address or "RAY_ADDRESS"
        raise ClusterUnreachable(f"raylm submit: the Jobs API at {where} did not take the request: {reason}") from None


def wait(address: str, job_id: str, timeout_s: float = 3600) -> dict[str, Any]:
    """Wait for the job to end; its final status and its logs."""
    from ray.job_submission import JobSubmissionClient

    with _jobs_api(address):
        client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id)).rsplit(".", 1)[-1]) not in FINAL_STATES:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(1)
    return {"job_id": job_id, "status": status, "logs": client.get_job_logs(job_id)}
