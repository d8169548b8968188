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


@pytest.mark.parametrize(("stage", "result"), [("train", "result.json"), ("prepare", "manifest.json")])
def test_results_without_a_stage_marker_are_refused_never_deleted(tmp_path, stage, result):
    """A stage folder with results but no stage.json (copied in by hand, written by an older raylm, the marker
    deleted): nothing says which config made them, so raylm neither reuses nor deletes them."""
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r"])
    directory = tmp_path / "r" / ("data" if stage == "prepare" else "train")
    directory.mkdir(parents=True)
    (directory / result).write_text("{}")
    for refused in (lambda: check_stages(cfg, (stage,), restart=False), lambda: claim_stage(cfg, stage, False)):
        with pytest.raises(StageConflict, match=rf"{directory} holds results .* no stage.json.*--restart"):
            refused()
    assert (directory / result).is_file()
    assert claim_stage(cfg, stage, restart=True)[1] is False and not (directory / result).exists()


def test_a_resumed_stage_refuses_shards_prepared_again_from_changed_inputs(tmp_path):
    from raylm.data.shards import shards_fingerprint

    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r"])
    manifest = {"format": "raylm.shards/1", "tokens": 100, "created_at": "2026-01-01", "seconds": 1.0}

    def check(shards: dict, reusable: bool) -> None:
        check_same_shards(cfg, "train", shards_fingerprint(shards), reusable)

    claim_stage(cfg, "train", restart=False)
    check(manifest, reusable=False)
    # Prepared again from the same inputs: only the time fields differ, the run may resume.
    check({**manifest, "created_at": "2026-02-02", "seconds": 9.0}, reusable=True)
    with pytest.raises(StageConflict, match=r"train: run 'r' started on other shards .* use --restart"):
        check({**manifest, "tokens": 101}, reusable=True)
    # A fresh start (--restart, or nothing to reuse) records the new shards.
    check({**manifest, "tokens": 101}, reusable=False)
    check({**manifest, "tokens": 101}, reusable=True)
