"""Several nodes for real: `ray.cluster_utils.Cluster` (a head and two worker nodes, each with its own raylet) in
a pytest session of its own, since one process joins one Ray cluster (`make test` runs `pytest tests/multinode`
after the rest). run.dir is checked from every node before a run; a training run puts one worker on each node."""

import json
import threading
import time

import pytest

from raylm.cluster import plan_resources
from raylm.config import load_config
from raylm.data.prepare import run_prepare
from raylm.nodes import StorageNotShared, check_run_dir_shared, nodes_missing
from raylm.storage import Location
from raylm.train.trainer import run_train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster():
    import ray

    import raylm  # noqa: F401  (raylm's environment before Ray starts)

    if ray.is_initialized():
        pytest.skip("multi-node tests need a pytest session of their own: pytest tests/multinode")
    from ray.cluster_utils import Cluster

    # The head holds no CPUs: workers and data go to the worker nodes, and a worker node can be taken away.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    for _ in range(2):
        nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, logging_level="WARNING", log_to_driver=False)
    from raylm.cluster import quiet_logging

    quiet_logging(verbose=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_every_node_is_asked_whether_it_sees_run_dir(cluster, tmp_path):
    marker = Location.parse(tmp_path / "marker")
    marker.write_text("x")
    assert nodes_missing(marker) == []
    missing = nodes_missing(Location.parse(tmp_path / "absent"))
    assert len(missing) == 3 and len(set(missing)) == 3  # one answer per node, each from its own node
    check_run_dir_shared(Location.parse(tmp_path))  # one machine's disk: every node sees it


def test_a_run_dir_the_nodes_cannot_see_stops_the_run_naming_them(cluster):
    """pyarrow's `mock://` filesystem lives in the memory of the process that opened it: the driver writes the
    marker, and no node's task can read it, as with a directory local to the driver's machine."""
    with pytest.raises(StorageNotShared) as refused:
        check_run_dir_shared(Location.parse("mock:///runs/t"))
    message = str(refused.value)
    assert message.startswith("run.dir=mock://runs is not seen from node(s) ") and "storage they all share" in message
    named = message.split("node(s) ")[1].split(":")[0]
    assert named.count("(") == 3  # every node, each by its address and id


def test_training_puts_one_worker_on_each_node(cluster, tmp_path):
    from ray.util.state import list_actors

    cfg = load_config(
        None,
        [
            *tiny_overrides(tmp_path),
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.placement_strategy=STRICT_SPREAD",
            "train.max_steps=6",
            "train.eval_every=6",
        ],
    )
    run_prepare(cfg)
    summary = run_train(cfg, plan_resources(cfg, embedded=False, cluster_cpus=6))
    assert summary["step"] == 6
    workers = [a for a in list_actors(detail=True, limit=1000) if a.class_name == "RayTrainWorker"]
    assert len(workers) == 2 and len({w.node_id for w in workers}) == 2


def _train_in_background(cfg, cluster_cpus: int) -> tuple[threading.Thread, dict]:
    """`run_train` in a thread while the test changes the cluster; its summary (or error) lands in the dict."""
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = run_train(cfg, plan_resources(cfg, embedded=False, cluster_cpus=cluster_cpus))
        except BaseException as err:
            outcome["error"] = err

    runner = threading.Thread(target=train)
    runner.start()
    return runner, outcome


def _wait_for_a_checkpoint(run_root, runner: threading.Thread, outcome: dict) -> None:
    deadline = time.monotonic() + 240
    while not list(run_root.rglob("checkpoint_*")) and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.5)
    assert list(run_root.rglob("checkpoint_*")), outcome


def _train_workers() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(detail=True, limit=1000) if a.class_name == "RayTrainWorker"]


def test_a_worker_node_removed_mid_run_resumes_from_the_last_checkpoint_on_a_new_node(cluster, tmp_path):
    cfg = load_config(
        None,
        [
            *tiny_overrides(tmp_path, name="moved"),
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.placement_strategy=STRICT_SPREAD",
            "train.max_steps=300",
            "train.eval_every=30",
            "train.max_failures=2",
        ],
    )
    run_prepare(cfg)
    runner, outcome = _train_in_background(cfg, cluster_cpus=4)
    run_root = tmp_path / "moved"
    _wait_for_a_checkpoint(run_root, runner, outcome)
    before: set = set()
    while len(before) < 2 and runner.is_alive():
        before = {w.node_id for w in _train_workers() if w.state == "ALIVE"}
    victims = [node for node in cluster.worker_nodes if node.node_id in before]
    assert victims, ("training ended before a node could be removed", outcome)
    victim = victims[0]
    cluster.remove_node(victim)
    replacement = cluster.add_node(num_cpus=2)
    runner.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["step"] == 300
    steps = [json.loads(line)["step"] for p in run_root.rglob("metrics.jsonl") for line in p.read_text().splitlines()]
    # Every step trained, none skipped; a step after the restart follows a checkpoint (a multiple of 30), never
    # step 1 again.
    assert set(steps) == set(range(1, 301)) and steps.count(1) == 1
    repeated = [step for i, step in enumerate(steps[1:], 1) if step <= steps[i - 1]]
    assert all(step % 30 == 1 for step in repeated), repeated
    # The group was rebuilt: workers ran on the removed node, then on its replacement.
    hosts = {w.node_id for w in _train_workers()}
    assert {victim.node_id, replacement.node_id} <= hosts


def test_an_elastic_run_grows_when_a_node_joins(cluster, tmp_path, monkeypatch):
    """`num_workers: [1, 2]` with room for one worker (2 CPUs each, a 3-CPU node: one CPU left for Ray Data) trains
    with one; a second node joins mid-run and Ray Train's resize monitor (every 2 s here, 60 s by default) restarts
    the group with two from the last checkpoint."""
    import raylm.train.trainer as trainer

    monkeypatch.setattr(trainer, "ELASTIC_RESIZE_INTERVAL_S", 2.0)
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    cfg = load_config(
        None,
        [
            *tiny_overrides(tmp_path, name="grows"),
            "train.num_workers=[1, 2]",
            "train.cpus_per_worker=2",
            "train.max_steps=400",
            "train.eval_every=20",
        ],
    )
    run_prepare(cfg)
    runner, outcome = _train_in_background(cfg, cluster_cpus=3)
    run_root = tmp_path / "grows"
    _wait_for_a_checkpoint(run_root, runner, outcome)
    assert len([w for w in _train_workers() if w.state == "ALIVE"]) == 1
    cluster.add_node(num_cpus=3)
    runner.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["step"] == 400
    records = [json.loads(line) for p in run_root.rglob("metrics.jsonl") for line in p.read_text().splitlines()]
    per_rank = [[int(k[4]) for k in r if k.startswith("rank") and k.endswith("_peak_rss_mib")] for r in records]
    ranks = [sorted(found) for found in per_rank if found]
    assert ranks[0] == [0] and ranks[-1] == [0, 1], (ranks[0], ranks[-1])
    # Resized, not restarted from scratch: every step trained, step 1 once.
    steps = [r["step"] for r in records]
    assert set(steps) == set(range(1, 401)) and steps.count(1) == 1
