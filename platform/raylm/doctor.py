"""`raylm doctor`: whether this machine, and the cluster it reaches, can run a config.

Each check says ok, warn or fail with its reason: the versions of ray, torch and transformers against the ranges
raylm declares; the cluster's CPUs and GPUs against what a training run needs; `run.dir` writable and, on a
cluster of several nodes, seen by every node (a marker written from here, read by a task pinned to each node);
Ray's authentication mode; and what `ray job submit --working-dir .` would upload against Ray's size limit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Any, Literal

from raylm.cluster import ResourcePlan
from raylm.config import Config
from raylm.nodes import UnplaceableError, check_placeable, nodes_not_seeing
from raylm.runs import RunPaths

CHECKED_PACKAGES = ("ray", "torch", "transformers")


@dataclass(frozen=True)
class Finding:
    check: str
    status: Literal["ok", "warn", "fail"]
    reason: str


def versions() -> list[Finding]:
    """Installed versions against raylm's own requirements (what it was tested with)."""
    from packaging.requirements import Requirement

    declared = {Requirement(text).name: Requirement(text) for text in (requires("raylm") or [])}
    findings = []
    for name in CHECKED_PACKAGES:
        try:
            installed = version(name)
        except PackageNotFoundError:
            findings.append(Finding(f"version: {name}", "fail", f"{name} is not installed"))
            continue
        wanted = declared.get(name)
        if wanted is None or wanted.specifier.contains(installed, prereleases=True):
            findings.append(Finding(f"version: {name}", "ok", installed))
        else:
            findings.append(Finding(f"version: {name}", "warn", f"{installed}, raylm wants {wanted.specifier}"))
    return findings


def resources(cfg: Config, plan: ResourcePlan) -> Finding:
    import ray

    total = ray.cluster_resources()
    have = f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
    try:
        check_placeable(cfg.train.min_workers, plan.cpus_per_worker, cfg.train.gpus_per_worker)
    except UnplaceableError as err:
        return Finding("resources", "fail", str(err))
    need = f"{cfg.train.min_workers} worker(s) x {plan.cpus_per_worker} CPU"
    if cfg.train.gpus_per_worker:
        need += f" + {cfg.train.gpus_per_worker:g} GPU"
    return Finding("resources", "ok", f"training needs {need}; the cluster has {have}")


def storage(cfg: Config) -> list[Finding]:
    """`run.dir` writable from here, and visible from every node of the cluster."""

    root = RunPaths.of(cfg).root.parent
    try:
        missing = nodes_not_seeing(root)
    except OSError as err:
        return [Finding("storage: writable", "fail", f"cannot write to run.dir={root}: {err}")]
    found = [Finding("storage: writable", "ok", str(root))]
    if missing:
        where = ", ".join(missing)
        reason = f"run.dir={root} is not seen from node(s) {where}: put it on shared storage (NFS, s3://, gs://)"
        return [*found, Finding("storage: shared", "fail", reason)]
    return [*found, Finding("storage: shared", "ok", "every node sees run.dir")]


def auth() -> Finding:
    """The cluster's own auth mode, as its Jobs API shows it to a client without the token (raylm sets
    RAY_AUTH_MODE=token in its own environment, which says nothing about the cluster's)."""
    import httpx
    import ray

    dashboard = ray._private.worker.get_dashboard_url()  # private: Ray is pinned
    if not dashboard:
        return Finding("auth", "warn", "cannot tell Ray's auth mode: the cluster runs no dashboard (Jobs API) to ask")
    url = dashboard if "://" in dashboard else f"http://{dashboard}"
    try:
        status = httpx.get(f"{url}/api/jobs/", timeout=10).status_code  # deliberately without the token
    except httpx.HTTPError as err:
        return Finding("auth", "warn", f"cannot tell Ray's auth mode: the Jobs API at {url} did not answer ({err})")
    if status in (401, 403):
        return Finding(
            "auth", "ok", f"Ray token authentication is on (the Jobs API at {url} refuses a client without it)"
        )
    return Finding(
        "auth",
        "warn",
        f"Ray token authentication is off on this cluster (the Jobs API at {url} answered {status} without a token): "
        "anyone who reaches its ports can run code on it; start it with RAY_AUTH_MODE=token",
    )


def upload(directory: Path) -> Finding:
    """What `ray job submit --working-dir <directory>` would upload, against Ray's package size limit."""
    return upload_verdict(upload_size(directory))


def upload_verdict(size: int) -> Finding:
    """An upload of `size` bytes against Ray's package size limit."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE  # Ray's limit; private, Ray pinned

    reason = f"{size / 2**20:.1f} MiB of {GCS_STORAGE_MAX_SIZE / 2**20:.0f} MiB allowed"
    if size >= GCS_STORAGE_MAX_SIZE:
        return Finding("upload", "fail", f"{reason}: exclude large files (.rayignore, .gitignore)")
    return Finding("upload", "warn" if size >= GCS_STORAGE_MAX_SIZE // 2 else "ok", reason)


def upload_files(directory: Path) -> list[Path]:
    """The files `ray job submit --working-dir <directory>` uploads, found by Ray's own walk of the tree: it honours
    .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore, in every folder, as the upload does."""
    from ray._private.runtime_env.packaging import _dir_travel  # the upload's walk; private, Ray pinned

    files: list[Path] = []
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger("raylm.doctor.upload")  # Ray's walk logs every ignore file it reads at INFO
    _dir_travel(directory.absolute(), [], lambda p: p.is_file() and files.append(p), include_gitignore, logger=quiet)
    return files


def upload_size(directory: Path) -> int:
    """Bytes of a job's upload, before compression (Ray's limit applies to the zip: this errs on the safe side)."""
    return sum(path.stat().st_size for path in upload_files(directory))


def run_doctor(cfg: Config, plan: ResourcePlan, directory: Path | None = None) -> dict[str, Any]:
    findings = [
        *versions(),
        resources(cfg, plan),
        *storage(cfg),
        auth(),
        upload(directory or Path.cwd()),
    ]
    show(findings)
    return {
        "stage": "doctor",
        "ok": all(f.status != "fail" for f in findings),
        "checks": [asdict(f) for f in findings],
    }


def show(findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.table import Table

    colors = {"ok": "green", "warn": "yellow", "fail": "red"}
    table = Table(title="raylm doctor")
    for column in ("check", "status", "reason"):
        table.add_column(column)
    for f in findings:
        table.add_row(f.check, f"[{colors[f.status]}]{f.status}[/]", f.reason)
    Console(stderr=True).print(table)
