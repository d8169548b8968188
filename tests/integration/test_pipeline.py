"""The whole pipeline in one call, as `raylm pipeline --ask` runs it: prepare -> train or tune -> gate + register ->
serve -> ask."""

import pytest

from raylm.cluster import plan_resources
from raylm.config import load_config
from raylm.pipeline import run_pipeline
from raylm.registry.aliases import resolve
from raylm.runs import RunPaths
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(420)


@pytest.mark.slow
def test_pipeline_trains_registers_serves_and_answers(ray_cluster, serve_port, tmp_path, capsys):
    # run.dir as a URI: every artifact goes through pyarrow filesystems, as it would on s3:// or gs://.
    overrides = [*tiny_overrides(tmp_path, name="pipe"), f"run.dir=file://{tmp_path}/runs", "tune.enabled=false"]
    cfg = load_config(None, [*overrides, f"serve.port={serve_port}"])
    assert cfg.run.dir.startswith("file://")
    summary = run_pipeline(cfg, plan_resources(cfg, embedded=True), ask="The river", max_tokens=5)

    assert [key for key in summary if key != "stage"] == ["prepare", "train", "register", "serve", "completion"]
    assert summary["train"]["step"] == cfg.train.max_steps
    assert summary["register"]["model"] == "pipe:1" and summary["serve"]["version"] == 1
    # The first model passes the eval gate (nothing to beat yet): it is `best`, and `best` is what is served.
    assert summary["register"]["promoted"] is True and summary["register"]["best"] == "pipe:1"
    assert "no version was promoted before" in summary["register"]["gate"]["reason"]
    completion = summary["completion"]
    assert completion["prompt"] == "The river" and isinstance(completion["text"], str)
    assert completion["usage"]["completion_tokens"] <= 5
    version = resolve(RunPaths.of(cfg).registry, "pipe:latest")
    assert version.manifest["source"] == "train"
    assert version.manifest["metrics"]["val_loss"] == summary["train"]["val_loss"]
    assert (tmp_path / "runs" / "registry" / "pipe" / "1" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "pipe" / "data" / "manifest.json").is_file()

    # The same command again reuses every stage: no new version, nothing retrained. A prompt that reads as rich
    # markup ([/b] closes a tag never opened) is printed as it is, after the run (it used to crash there).
    again = run_pipeline(cfg, plan_resources(cfg, embedded=True), ask="a[/b] [bold]x", max_tokens=5)
    assert again["completion"]["prompt"] == "a[/b] [bold]x"
    assert "a[/b] [bold]x" in capsys.readouterr().err
    assert again["prepare"]["cache"] == "hit"
    assert again["train"] == summary["train"]
    assert again["register"]["new"] is False and again["register"]["version"] == 1


@pytest.mark.slow
def test_pipeline_with_a_sweep_gates_and_serves_the_best_and_skips_what_is_done(ray_cluster, serve_port, tmp_path):
    overrides = [
        *tiny_overrides(tmp_path, name="swept"),
        f"serve.port={serve_port}",
        'tune.space={"train.lr": {"grid": [3e-3, 1e-5]}}',
        "tune.scheduler=grid",
        "tune.budget_tokens=1536",  # 6 steps at batch 8 x seq_len 32
        "tune.max_concurrent_trials=1",
    ]
    cfg = load_config(None, overrides)
    summary = run_pipeline(cfg, plan_resources(cfg, embedded=True), ask="The river", max_tokens=3)

    assert [key for key in summary if key != "stage"] == ["prepare", "tune", "register", "serve", "completion"]
    assert summary["tune"]["best_config"] == {"train.lr": 3e-3} and summary["tune"]["step"] == 6
    # An all-grid space runs each configuration once, though the config asks for 4 samples.
    assert cfg.tune.num_samples == 4 and sorted(t["train.lr"] for t in summary["tune"]["trials"]) == [1e-5, 3e-3]
    registered = summary["register"]
    assert registered["source"] == "tune" and registered["promoted"] and registered["best"] == "swept:1"
    assert summary["serve"]["version"] == 1 and summary["completion"]["usage"]["completion_tokens"] <= 3
    version = resolve(RunPaths.of(cfg).registry, "swept:best")
    assert version.manifest["trial_id"] == summary["tune"]["best_trial"]

    # Again: the shards are cached, the finished sweep reused, the same weights not registered twice.
    again = run_pipeline(cfg, plan_resources(cfg, embedded=True), ask="The river", max_tokens=3)
    assert again["prepare"]["cache"] == "hit"
    assert again["tune"] == summary["tune"]
    assert again["register"]["new"] is False and again["register"]["model"] == "swept:1"
