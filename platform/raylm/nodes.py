"""What raylm checks of a cluster's nodes before a run, and the Ray 2.60 behaviours it works around there.

Node checks: every training worker can be placed (fail at once rather than pend forever), and every node sees
run.dir (a local folder on one node is invisible to the others, and their checkpoints would be lost). Workarounds:
Ray Data's stats actor started from the driver (created from a worker it pins that worker's placement group for
good), and a stopped Train run's reservation with Ray Data's coordinator given back (figures in bench/README.md).
"""

from __future__ import annotations

import uuid

from raylm.errors import UsageError
from raylm.storage import Location


class UnplaceableError(UsageError):
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


class StorageNotShared(UsageError):
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


TRAIN_RESERVATION_PREFIX = "train-"


def release_train_reservation(run_id: str) -> None:
    """Give back the CPUs a Ray Train run reserved with Ray Data's coordinator, once the run is gone: Ray 2.60 cancels
    it only when the run's controller shuts down cleanly, and a stopped trial's does not (the next trial's data
    stream waits up to 180 s: bench/README.md, "Sweeps"). Cancelling a run that ended cleanly, or twice, does nothing;
    fire and forget, since the reservation expires anyway."""
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:
        return  # no coordinator, so nothing reserved
    coordinator.cancel_request.remote(requester_id=TRAIN_RESERVATION_PREFIX + run_id)
