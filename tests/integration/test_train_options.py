"""Training options through real Ray Train runs: an elastic worker range, epochs, bf16 autocast on CPU, gradient
accumulation, MLflow, and memory that stays flat as steps go by."""

import math

import pytest

from raylm.cluster import plan_resources
from raylm.config import load_config
from raylm.data.prepare import run_prepare
from raylm.runs import RunPaths
from raylm.train.checkpoint import read_checkpoint_manifest
from raylm.train.ingest import expected_ledger
from raylm.train.observe import read_metrics
from raylm.train.trainer import run_train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(600)


def _config(tmp_path, name: str, *overrides: str):
    cfg = load_config(None, [*tiny_overrides(tmp_path, name), *overrides])
    return cfg, run_prepare(cfg)


@pytest.mark.slow
def test_elastic_range_starts_with_what_fits_and_memory_stays_flat(ray_cluster, tmp_path):
    """`num_workers: [1, 2]` on a cluster with room for 2 trains with 2; over 200 steps no worker's peak RSS grows
    more than 10% after step 20 (nothing accumulates per step: metrics, ledgers, prefetched batches)."""
    cfg, data = _config(
        tmp_path,
        "elastic",
        "train.num_workers=[1, 2]",
        "train.cpus_per_worker=1",
        "train.max_steps=200",
        "train.eval_every=20",
    )
    summary = run_train(cfg, plan_resources(cfg, embedded=True))
    assert summary["step"] == 200
    ledgers = read_checkpoint_manifest(summary["checkpoint"])["ledgers"]
    assert len(ledgers) == 2  # Ray Train placed the maximum
    for rank in range(2):
        assert ledgers[rank] == expected_ledger(data["data_dir"], 0, 8, 2, rank, 200).state()

    records = {r["step"]: r for r in read_metrics(RunPaths.of(cfg).train / "logs")}
    for rank in range(2):
        early, late = records[20][f"rank{rank}_peak_rss_mib"], records[200][f"rank{rank}_peak_rss_mib"]
        assert late <= 1.10 * early, f"rank {rank}: peak RSS {early:.0f} MiB at step 20, {late:.0f} MiB at 200"


def test_epochs_bf16_accumulation_and_mlflow(ray_cluster, tmp_path):
    import mlflow

    tracking = f"file://{tmp_path / 'mlruns'}"
    cfg, data = _config(
        tmp_path,
        "epochs",
        "train.max_steps=null",
        "train.epochs=1",
        "train.num_workers=1",
        "train.micro_batch_size=4",  # 2 micro batches per step
        "train.precision=bf16",
        "train.tensorboard=false",
        f"train.mlflow_tracking_uri={tracking}",
    )
    summary = run_train(cfg, plan_resources(cfg, embedded=True))
    steps = math.ceil(data["train_blocks"] / 8)
    assert summary["step"] == steps and summary["epoch"] == 1
    assert summary["samples_consumed"] == steps * 8 >= data["train_blocks"]
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(data["vocab_size"])

    logs = RunPaths.of(cfg).train.local / "logs"
    assert not list(logs.glob("events.out.tfevents*")) and (logs / "metrics.jsonl").is_file()

    client = mlflow.tracking.MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("epochs").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert client.get_metric_history(run.info.run_id, "val_loss")[-1].value == pytest.approx(summary["val_loss"])
    assert run.data.params["train.precision"] == "bf16"


def test_the_clusters_workers_run_with_raylms_worker_variables(ray_cluster):
    """A worker of an embedded cluster sees raylm's variables (cluster.worker_env): the share of the cluster a
    Ray Data executor that died held expires after 30 s, not Ray's 180 s."""
    import os

    import ray

    probe = ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"))
    assert ray.get(probe.remote()) == "30"


def test_serves_http_proxy_reaches_replicas_over_grpc_in_the_throughput_mode(ray_cluster):
    """What Serve's proxy decides in the cluster's processes: the throughput-optimized mode without direct ingress,
    and gRPC from the HTTP proxy to the replicas (Ray 2.60's throughput mode alone leaves it on Ray actor calls)."""
    import ray

    @ray.remote(num_cpus=0)
    def serve_settings():
        from ray.serve._private import constants

        names = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_PROXY_USE_GRPC")
        return {name: getattr(constants, name) for name in names}

    assert ray.get(serve_settings.remote()) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": True,
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": False,
        "RAY_SERVE_PROXY_USE_GRPC": True,
    }
