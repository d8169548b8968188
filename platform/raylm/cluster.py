"""Connect to a Ray cluster or start an embedded one, with resources planned so the defaults never deadlock.

On a 2-core laptop two 1-CPU training workers take every CPU and Ray Data's read tasks never get scheduled: the
run hangs. So the embedded cluster advertises a few more logical CPUs than the machine has (`INGEST_CPUS`, kept for
Ray Data), and training workers get CPUs (and as many torch threads) in proportion to the real cores, so that one
worker uses the whole machine and two workers share it instead of oversubscribing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raylm.config import Config

INGEST_CPUS = 2
"""Logical CPUs of the embedded cluster left free for Ray Data (reading shards, tokenizing)."""

_QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "filelock")


class ExpectedNoiseFilter(logging.Filter):
    """Drops console warnings about choices raylm makes on purpose (it shows its own progress display)."""

    EXPECTED = ("Progress bars disabled", "Progress bars for operators disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ResourcePlan:
    cpus_per_worker: int
    """CPUs (and torch threads) per worker of a single training run."""
    trial_cpus_per_worker: int
    """CPUs per worker inside a sweep, where concurrent trials share the machine rather than each taking all of it."""
    concurrent_trials: int
    tokenize_actors: int
    """Ray Data actors tokenizing in prepare, one thread each."""
    cluster_cpus: int | None
    """Logical CPUs to start an embedded cluster with; None when connecting to an existing cluster."""


def plan_resources(
    cfg: Config, embedded: bool, cluster_cpus: float | None = None, cluster_gpus: float | None = None
) -> ResourcePlan:
    """CPUs per training worker, concurrent sweep trials, and (embedded) the cluster's logical CPU count.
    Concurrent trials: as many as the CPUs (and, for GPU trials, the GPUs) hold given each trial's workers."""
    workers = cfg.train.max_workers
    cores = local_cores()
    budget = cores if embedded else max(1, int((cluster_cpus or cores) - INGEST_CPUS))
    trials = max(1, min(cfg.tune.trial_count, budget // workers))
    if cfg.train.gpus_per_worker and cluster_gpus is not None:
        trials = max(1, min(trials, int(cluster_gpus // (workers * cfg.train.gpus_per_worker))))
    trials = cfg.tune.max_concurrent_trials or trials
    if cfg.train.cpus_per_worker is not None:
        cpus = trial_cpus = cfg.train.cpus_per_worker
    elif embedded:
        cpus, trial_cpus = max(1, cores // workers), max(1, cores // (workers * trials))
    else:
        cpus = trial_cpus = 1
    needed = max(cores, workers * cpus, trials * workers * trial_cpus)
    return ResourcePlan(
        cpus_per_worker=cpus,
        trial_cpus_per_worker=trial_cpus,
        concurrent_trials=trials,
        tokenize_actors=cores if embedded else max(1, int((cluster_cpus or cores) - 1)),
        cluster_cpus=needed + INGEST_CPUS if embedded else None,
    )


def target_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def worker_env() -> dict[str, str]:
    """Variables raylm's Ray workers need whoever started the cluster: set in this process for an embedded cluster,
    and in the runtime env of a job on a cluster raylm connects to. Ray Data's executors that die without shutting
    down (a stopped trial's) keep their share of the cluster until their request expires: 30 s instead of Ray's 180 s
    (measured in bench/README.md, "Sweeps")."""
    return {
        "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": os.environ.get("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")
    }


# Ray Serve's throughput-optimized mode and gRPC from the HTTP proxy to the replicas (asked for by name: Ray 2.60
# derives the proxy's transport before that mode turns it on), without the experimental direct ingress, so host, port,
# queue limits and timeouts mean what they say. Measured in bench/README.md ("Serving"). prepare_environment gives
# them to an embedded cluster; a `ray start` cluster needs them in that command's environment (cluster.yaml).
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def prepare_environment() -> None:
    """Environment every raylm process (and the Ray workers it starts) runs with."""
    for name, value in worker_env().items():
        os.environ.setdefault(name, value)
    # Token auth on by default, for embedded clusters and clients alike; an explicit RAY_AUTH_MODE wins.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # No hub downloads unless the user asks for a hub id; telemetry off.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Transformers draws a progress bar per checkpoint save and load: noise in every worker's output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's newer console output ignores `verbose=0` and prints tables; raylm shows its own progress.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray Data logs every dataset execution at INFO to the console; keep its file logs, quiet its console.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)


_log_level = logging.WARNING


def quiet_logging(verbose: bool) -> None:
    global _log_level
    _log_level = logging.INFO if verbose else logging.WARNING
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(_log_level)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose


def quiet_logger(name: str) -> None:
    """Re-apply the session's log level to a logger that a library configured on import (`ray.serve` does)."""
    logging.getLogger(name).setLevel(_log_level)


def shipped_package_runtime_env(package_dir: Path | None = None, cwd: Path | None = None) -> dict | None:
    """Inside a Ray job that shipped this checkout (`ray job submit --working-dir .`, `raylm submit`), the driver
    imports raylm from the shipped copy (jobs/*.py put `platform/` first on sys.path), but the job's workers only get
    the working dir itself on their path, not `platform/`: give them the same package as a `py_modules` entry (merged
    into the job's runtime env), so the cluster's nodes need not have raylm installed, and an installed one on a
    node never stands in for the code the job shipped."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # private: Ray is pinned

    package_dir = (package_dir or Path(__file__).parent).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    if RAY_JOB_CONFIG_JSON_ENV_VAR not in os.environ or not package_dir.is_relative_to(cwd):
        return None
    return {"py_modules": [str(package_dir)]}


@contextlib.contextmanager
def ray_session(cfg: Config, address: str | None = None, verbose: bool = False) -> Iterator[ResourcePlan]:
    """Use the Ray already initialised in this process, connect to `address`/`RAY_ADDRESS`, or start an embedded
    cluster sized for `cfg`. Yields the resource plan; stops (or disconnects from) only what it started."""
    prepare_environment()
    import ray

    target = target_address(address)
    embedded = target is None
    started = not ray.is_initialized()
    if started:
        common = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
        if embedded:
            # The dashboard serves the state API, which Ray Train uses to free the placement groups of a
            # trial that Tune stopped early; without it they leak and the next trial waits forever.
            ray.init(num_cpus=plan_resources(cfg, embedded=True).cluster_cpus, include_dashboard=True, **common)
        else:
            runtime_env = {**(shipped_package_runtime_env() or {}), "env_vars": worker_env()}
            ray.init(address=target, runtime_env=runtime_env, **common)
    quiet_logging(verbose)
    try:
        resources = ray.cluster_resources()
        yield plan_resources(cfg, embedded, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
    finally:
        if started:
            ray.shutdown()
