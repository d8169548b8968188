import pytest

from raylm.config import load_config
from raylm.runs import StageConflict, check_same_shards, check_stages, claim_stage


def test_same_config_reuses_changed_config_is_refused_restart_clears(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r", "data.seq_len=64"])
    directory, reusable = claim_stage(cfg, "prepare", restart=False)
    assert not reusable
    (directory / "manifest.json").write_text("{}")  # the stage's durable result

    assert claim_stage(cfg, "prepare", restart=False) == (directory, True)

    changed = load_config(None, [f"run.dir={tmp_path}", "run.name=r", "data.seq_len=128"])
    with pytest.raises(StageConflict, match=r"data.seq_len: 64 -> 128.*--restart"):
        check_stages(changed, ("prepare",), restart=False)
    with pytest.raises(StageConflict):
        claim_stage(changed, "prepare", restart=False)

    directory, reusable = claim_stage(changed, "prepare", restart=True)
    assert not reusable and not (directory / "manifest.json").exists()


def test_an_attempt_without_results_is_taken_over(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r"])
    claim_stage(cfg, "train", restart=False)  # no checkpoint, no result: a run that failed early
    changed = load_config(None, [f"run.dir={tmp_path}", "run.name=r", "train.lr=0.01"])
    check_stages(changed, ("train",), restart=False)
    assert claim_stage(changed, "train", restart=False)[1] is False


def test_a_resumed_stage_refuses_shards_prepared_again_from_changed_inputs(tmp_path):

    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r"])
    manifest = {"format": "raylm.shards/1", "tokens": 100, "created_at": "2026-01-01", "seconds": 1.0}
    claim_stage(cfg, "train", restart=False)
    check_same_shards(cfg, "train", manifest, reusable=False)
    # Prepared again from the same inputs: only the time fields differ, the run may resume.
    check_same_shards(cfg, "train", {**manifest, "created_at": "2026-02-02", "seconds": 9.0}, reusable=True)
    with pytest.raises(StageConflict, match=r"train: run 'r' started on other shards .* use --restart"):
        check_same_shards(cfg, "train", {**manifest, "tokens": 101}, reusable=True)
    # A fresh start (--restart, or nothing to reuse) records the new shards.
    check_same_shards(cfg, "train", {**manifest, "tokens": 101}, reusable=False)
    check_same_shards(cfg, "train", {**manifest, "tokens": 101}, reusable=True)
