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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raylm.config import Config

if TYPE_CHECKING:
    from raylm.storage import Location

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


class UnplaceableError(ValueError):
    """The cluster cannot ever place what the config asks for (it would otherwise wait forever)."""


def nodes_not_seeing(directory: Location) -> list[str]:
    """The alive nodes that cannot see a file written into `directory` from here (OSError if it cannot be
    written)."""
    marker = directory / f".raylm-shared-{uuid.uuid4().hex}"
    marker.write_text("written by the driver; every node must see it")
    try:
        return nodes_missing(marker)
    finally:
        marker.unlink()


def nodes_missing(marker: Location) -> list[str]:
    """The alive nodes from which `marker` (a file under run.dir) cannot be read: a task pinned to each node looks.
    A run on several nodes needs run.dir on storage they share (NFS, an object store); a local directory on one
    node is invisible to the others, and their checkpoints would be lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raylm.storage import Location

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Location.parse(path).is_file()

    checks = {
        f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(str(marker))
        for node in ray.nodes()
        if node.get("Alive")
    }
    return [node for node, seen in zip(checks, ray.get(list(checks.values()), timeout=120), strict=True) if not seen]


class StorageNotShared(ValueError):
    """run.dir is not visible from every node of a multi-node cluster."""


def check_run_dir_shared(root: Location) -> None:
    """On a cluster of several nodes, fail before a run starts unless every node sees run.dir: a marker is written
    here and read from each node. (One node: nothing to check.)"""
    import ray

    if sum(1 for node in ray.nodes() if node.get("Alive")) < 2:
        return
    missing = nodes_not_seeing(root)
    if missing:
        raise StorageNotShared(
            f"run.dir={root.parent} is not seen from node(s) {', '.join(missing)}: a run on several nodes needs "
            "run.dir on storage they all share (NFS, s3://, gs://), or the workers' checkpoints are lost"
        )


def check_placeable(workers: int, cpus_per_worker: int, gpus_per_worker: float = 0) -> None:
    """Fail fast when `workers` x `cpus_per_worker` CPUs (and GPUs) can never fit in the cluster."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if gpus_per_worker:
        gpus = [node["Resources"].get("GPU", 0) for node in nodes]
        if max(gpus, default=0) < gpus_per_worker or sum(gpus) < workers * gpus_per_worker:
            raise UnplaceableError(
                f"train.num_workers={workers} x train.gpus_per_worker={gpus_per_worker:g} GPUs, but the cluster "
                f"has {sum(gpus):g} GPUs (largest node {max(gpus, default=0):g})"
            )
    largest = max((node["Resources"].get("CPU", 0) for node in nodes), default=0)
    total = sum(node["Resources"].get("CPU", 0) for node in nodes)
    if cpus_per_worker > largest:
        raise UnplaceableError(
            f"a training worker needs {cpus_per_worker} CPUs (train.cpus_per_worker) but the largest node has "
            f"{largest:g}"
        )
    needed = workers * cpus_per_worker
    if needed > total:
        raise UnplaceableError(
            f"train.num_workers={workers} x {cpus_per_worker} CPUs = {needed} CPUs, but the cluster has {total:g}: "
            "lower train.num_workers or train.cpus_per_worker"
        )


def start_data_stats_actor() -> None:
    """Start Ray Data's one-per-cluster stats actor from the driver, before any training worker runs a dataset.

    The first dataset anyone runs creates it, as a detached actor; created from a training worker it inherits the
    worker's placement group and pins it for good: that trial's (or run's) CPUs are never given back, and on a
    small cluster the next sweep trial waits forever for them."""
    import ray

    try:
        from ray.data._internal.stats import get_or_create_stats_actor  # private: Ray is pinned (pyproject)
    except ImportError:  # a later Ray: any dataset run from here creates it
        ray.data.range(1).materialize()
        return
    ray.get(get_or_create_stats_actor().__ray_ready__.remote())


def target_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def worker_env() -> dict[str, str]:
    """Variables raylm's Ray workers need whoever started the cluster: set in this process for an embedded cluster,
    and in the runtime env of a job on a cluster raylm connects to.

    Ray Data's executors share the cluster's CPUs and object store through one coordinator, each renewing its
    request every 10 s. An executor that dies without shutting down (the training worker of a trial ASHA stopped, a
    killed worker) keeps its share until its request expires, 180 s by default: the next trial's data stream is
    held to what the dead one leaves, and its training waits for blocks. At 30 s the share comes back within about
    50 s (the coordinator purges every 20 s). Measured in a 4-trial sweep on 2 cores, the same trial after a stop:
    2,850 tokens/s (80 s) at 180 s, 8,600 tokens/s (49 s) at 30 s."""
    return {
        "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": os.environ.get("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")
    }


TRAIN_RESERVATION_PREFIX = "train-"


def release_train_reservation(run_id: str) -> None:
    """Give back the CPUs a Ray Train run reserved with Ray Data's coordinator, once the run is gone.

    Ray 2.60's Train controller reserves its worker group's resources there (high priority, a fixed 180 s expiry,
    renewed every 20 s) and cancels the reservation only when it shuts down cleanly. A Tune trial that is stopped
    (ASHA, or its budget) is ended with its actor, the controller dies with it, and on a small cluster the next
    trial's Ray Data stream gets no CPU until the reservation expires: measured on 2 cores, trials after a stopped
    one trained at 2,300-4,300 tokens/s for their first minute instead of ~10,000. Cancelling a run that already
    ended cleanly, or twice, does nothing. Fire and forget: the reservation is only a share, and expires anyway."""
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:
        return  # no coordinator, so nothing reserved
    coordinator.cancel_request.remote(requester_id=TRAIN_RESERVATION_PREFIX + run_id)


# Ray Serve's throughput-optimized mode (user code and router on the replica's main loop, buffered request logs) and
# gRPC from the HTTP proxy to the replicas: together the no-op route costs 1.8 ms over bare uvicorn on 2 cores instead
# of 7.6 ms (bench/serve.py). gRPC is asked for by name because Ray 2.60 derives the proxy's transport before the
# throughput mode turns gRPC on (py-spy showed Ray actor calls on every request). Without the experimental direct
# ingress: the HTTP proxy stays, so host, port, queue limits and timeouts mean what they say. prepare_environment
# gives them to the processes of an embedded cluster; a `ray start` cluster needs them in that command's environment
# (cluster.yaml's start commands carry each one: tests/unit/test_shipped_configs.py).
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
