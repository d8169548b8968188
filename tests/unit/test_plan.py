"""Resource planning for a sweep: how many trials run at once on a given cluster (no Ray needed)."""

from raylm.cluster import INGEST_CPUS, plan_resources
from raylm.config import load_config


def concurrent(overrides, cpus, gpus=0.0) -> int:
    cfg = load_config(None, overrides)
    return plan_resources(cfg, embedded=False, cluster_cpus=cpus, cluster_gpus=gpus).concurrent_trials


def test_trials_fit_the_cpus_left_after_ray_data():
    # 16 CPUs, 2 kept for Ray Data: 14 one-CPU workers, 2 per trial -> 7 trials, capped by the samples drawn.
    assert concurrent(["train.num_workers=2", "tune.num_samples=20"], cpus=16) == (16 - INGEST_CPUS) // 2
    assert concurrent(["train.num_workers=2", "tune.num_samples=3"], cpus=16) == 3
    assert (
        concurrent(["train.num_workers=[1, 4]", "train.batch_size=12", "tune.num_samples=20"], cpus=10) == 2
    )  # max: 4


def test_a_grid_counts_every_configuration_it_runs():
    # num_samples=1 over a 3 x 3 grid is 9 trials: 7 fit 14 CPUs at 2 workers each (not 1, the samples drawn).
    grid = 'tune.space={"train.lr": {"grid": [1e-3, 3e-3, 1e-2]}, "train.batch_size": {"grid": [8, 16, 32]}}'
    assert concurrent(["train.num_workers=2", "tune.num_samples=1", grid], cpus=16) == 7
    assert concurrent(["train.num_workers=1", "tune.num_samples=1", grid], cpus=16) == 9
    two = 'tune.space={"train.lr": {"grid": [1e-3, 3e-3]}, "train.weight_decay": {"uniform": [0.0, 0.1]}}'
    assert concurrent(["train.num_workers=1", "tune.num_samples=3", two], cpus=64) == 6


def test_an_all_grid_space_runs_each_configuration_once():
    # A second draw of an all-grid space would rerun every configuration with the same seed: one draw, 4 trials.
    grid = 'tune.space={"train.lr": {"grid": [1e-3, 3e-3]}, "train.batch_size": {"grid": [8, 16]}}'
    tune = load_config(None, ["tune.num_samples=4", grid]).tune
    assert (tune.samples, tune.trial_count) == (1, 4)
    assert concurrent(["train.num_workers=1", "tune.num_samples=4", grid], cpus=64) == 4
    # One parameter drawn at random and each draw differs: 4 draws, each over the whole grid.
    mixed = 'tune.space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.batch_size": {"grid": [8, 16]}}'
    tune = load_config(None, ["tune.num_samples=4", mixed]).tune
    assert (tune.samples, tune.trial_count) == (4, 8)


def test_gpu_trials_fit_the_gpus():
    gpu = ["train.gpus_per_worker=1", "tune.num_samples=8"]
    assert concurrent([*gpu, "train.num_workers=1"], cpus=64, gpus=4) == 4
    assert concurrent([*gpu, "train.num_workers=2"], cpus=64, gpus=4) == 2
    assert concurrent([*gpu, "train.num_workers=1", "train.gpus_per_worker=0.5"], cpus=64, gpus=1) == 2
    assert concurrent([*gpu, "train.num_workers=1", "tune.max_concurrent_trials=3"], cpus=64, gpus=1) == 3  # asked


def test_a_dead_data_executors_share_of_the_cluster_expires_after_30_seconds(monkeypatch):
    """Ray Data keeps a dead executor's share of the cluster until its request expires (180 s by default): raylm's
    processes and the workers of an embedded cluster run with 30 s, and a user's own setting wins."""
    from raylm.cluster import worker_env

    monkeypatch.delenv("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", raising=False)
    assert worker_env() == {"RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "30"}
    monkeypatch.setenv("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "60")
    assert worker_env()["RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"] == "60"
