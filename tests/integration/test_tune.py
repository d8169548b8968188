"""tune: real Ray Tune trials, each a TorchTrainer, ASHA; the best trial is chosen and registered."""

from pathlib import Path

import pytest

from raylm.cluster import plan_resources
from raylm.config import validate_config
from raylm.registry import resolve, run_register
from raylm.runs import RunPaths
from raylm.tune import run_tune

pytestmark = pytest.mark.timeout(600)


def test_sweep_picks_the_best_trial_and_registers_it(prepared):
    base, _ = prepared
    tree = base.model_dump(mode="json")
    tree["registry"] = {"name": "sweep"}
    tree["tune"] = {
        "space": {"train.lr": {"grid": [3e-5, 3e-3]}, "train.batch_size": {"choice": [4, 8]}},
        "num_samples": 1,
        "scheduler": "asha",
        "asha": {"grace_period": 1, "reduction_factor": 2},
    }
    cfg = validate_config(tree)  # same run.name: the sweep reads the shards prepared for it

    summary = run_tune(cfg, plan_resources(cfg, embedded=True))

    assert len(summary["trials"]) == 2 and summary["errored"] == 0
    losses = {t["train.lr"]: t["val_loss"] for t in summary["trials"]}
    assert summary["val_loss"] == min(losses.values())
    assert summary["best_config"]["train.lr"] == 3e-3, "a 100x larger lr learns more in 12 steps"
    assert summary["best_config"]["train.batch_size"] in (4, 8)
    best = next(t for t in summary["trials"] if t["trial_id"] == summary["best_trial"])
    assert best["steps"] == cfg.train.max_steps
    assert Path(summary["checkpoint"], "model.safetensors").is_file()
    assert Path(summary["checkpoint"]).is_relative_to((RunPaths.of(cfg).tune / "trials").local)

    registered = run_register(cfg)
    assert registered["source"] == "tune" and registered["version"] == 1
    version = resolve(RunPaths.of(cfg).registry, "sweep:latest")
    assert version.manifest["trial_config"] == summary["best_config"]
    assert version.manifest["trial_id"] == summary["best_trial"]
    assert version.manifest["metrics"]["val_loss"] == summary["val_loss"]
    assert version.manifest["data_manifest_sha256"]
