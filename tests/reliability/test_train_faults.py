"""Training under faults, on the shared real cluster: a SIGKILLed worker is replaced and the run resumes from its
last checkpoint at the exact data position; with max_failures=0 it fails fast and leaves nothing running."""

import os
import signal
import threading
import time

import pytest

from raylm.cluster import plan_resources
from raylm.config import load_config
from raylm.data.prepare import run_prepare
from raylm.runs import RunPaths
from raylm.train.checkpoint import checkpoint_dirs, read_checkpoint_manifest
from raylm.train.ingest import expected_ledger
from raylm.train.trainer import TrainingFailed, run_train
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _alive(class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(
        filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], raise_on_missing_output=False
    )


def _kill_a_worker_after_the_first_checkpoint(cfg, killed: list) -> threading.Thread:
    train_dir = RunPaths.of(cfg).train

    def kill() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if train_dir.glob("checkpoint_*"):
                workers = _alive("RayTrainWorker")
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _config(tmp_path, name: str, *overrides: str):
    cfg = load_config(
        None,
        [
            *tiny_overrides(tmp_path, name),
            "train.num_workers=2",
            "train.max_steps=24",
            "train.eval_every=4",
            *overrides,
        ],
    )
    run_prepare(cfg)
    return cfg


def test_a_killed_worker_is_replaced_and_no_block_is_skipped_or_repeated(ray_cluster, tmp_path):
    cfg = _config(tmp_path, "killed", "train.max_failures=2")
    killed: list = []
    killer = _kill_a_worker_after_the_first_checkpoint(cfg, killed)
    summary = run_train(cfg, plan_resources(cfg, embedded=True))
    killer.join()
    assert killed, "a training worker was killed mid-run"
    assert summary["step"] == 24 and summary["samples_consumed"] == 24 * 8
    ledgers = read_checkpoint_manifest(summary["checkpoint"])["ledgers"]
    for rank in range(2):
        assert ledgers[rank] == expected_ledger(str(RunPaths.of(cfg).data), 0, 8, 2, rank, 24).state()

    # The same run without the fault ends where the faulted one did (within 1% validation loss).
    clean = run_train(_config(tmp_path, "clean"), plan_resources(cfg, embedded=True))
    assert abs(summary["val_loss"] - clean["val_loss"]) <= 0.01 * clean["val_loss"]


def test_without_retries_a_killed_worker_fails_fast_and_leaks_nothing(ray_cluster, tmp_path):
    from ray.util import placement_group_table

    cfg = _config(tmp_path, "fragile", "train.max_failures=0", "train.max_steps=400")
    killed: list = []
    killer = _kill_a_worker_after_the_first_checkpoint(cfg, killed)
    started = time.monotonic()
    with pytest.raises(TrainingFailed) as err:
        run_train(cfg, plan_resources(cfg, embedded=True))
    killer.join()
    assert killed and time.monotonic() - started < 240
    message = str(err.value)
    assert "train.max_failures=0" in message
    assert f"the worker process died (pid {killed[0]} on " in message, message
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_alive("RayTrainWorker") or _alive("TrainController")):
        time.sleep(1)
    assert not _alive("RayTrainWorker") and not _alive("TrainController")
    while time.monotonic() < deadline and any(pg["state"] != "REMOVED" for pg in placement_group_table().values()):
        time.sleep(1)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def read_step(checkpoint) -> int:
    return read_checkpoint_manifest(checkpoint)["step"]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(ray_cluster, tmp_path, capsys):
    """The two newest checkpoints gone bad, each passed over with a warning naming the file: the latest's weights with
    one byte flipped at the same size (only the SHA-256 in its manifest tells), the one before with its manifest cut
    short (JSON that no longer parses; truncated weights: tests/unit/test_checkpoint.py). The run resumes from the
    newest good one and finishes exactly as planned, on the same data."""
    from pathlib import Path

    cfg = _config(tmp_path, "corrupt", "train.num_workers=1", "train.max_steps=12", "train.num_to_keep=3")
    plan = plan_resources(cfg, embedded=True)
    first = run_train(cfg, plan)
    latest = Path(first["checkpoint"])
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size: only the hash can tell
    second = next(Path(c.path) for c in checkpoint_dirs(RunPaths.of(cfg).train) if read_step(c) == 8)
    (second / "raylm_checkpoint.json").write_text('{"format": "raylm.checkpoint/2", "step": 8, "fi')  # cut short
    (RunPaths.of(cfg).train / "result.json").unlink()  # as if the run had stopped right after writing it

    again = run_train(cfg, plan)
    warning = capsys.readouterr().err
    assert f"{weights} does not match the SHA-256" in warning, warning
    assert f"{second / 'raylm_checkpoint.json'} is not valid JSON" in warning, warning
    assert "resuming from" in warning
    assert again["resumed"] is True and again["step"] == 12
    expected = expected_ledger(str(RunPaths.of(cfg).data), 0, 8, 1, 0, 12).state()
    assert read_checkpoint_manifest(again["checkpoint"])["ledgers"] == [expected]


def test_a_killed_driver_run_again_resumes_where_it_stopped(ray_cluster, tmp_path):
    import subprocess
    import sys
    import tempfile

    from tests.conftest import REPO
    from tests.integration.test_cli import _processes_mentioning

    overrides = [*tiny_overrides(tmp_path, "driver"), "train.max_steps=20", "train.eval_every=5"]
    cfg = load_config(None, overrides)
    run_prepare(cfg)
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    process = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "train", *overrides],
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    train_dir = RunPaths.of(cfg).train
    deadline = time.monotonic() + 240
    while not train_dir.glob("checkpoint_*") and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # no cleanup, no handler: the driver is simply gone
    process.wait(timeout=30)
    time.sleep(3)
    for pid in _processes_mentioning(ray_tmp):  # what the dead driver's embedded cluster left behind
        os.kill(pid, signal.SIGKILL)
    assert train_dir.glob("checkpoint_*") and not (train_dir / "result.json").exists()

    summary = run_train(cfg, plan_resources(cfg, embedded=True))
    assert summary["resumed"] is True and summary["step"] == 20
    expected = expected_ledger(str(RunPaths.of(cfg).data), 0, 8, 1, 0, 20).state()
    assert read_checkpoint_manifest(summary["checkpoint"])["ledgers"] == [expected]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(ray_cluster, tmp_path):
    import pyarrow.fs as pafs
    from ray import cloudpickle
    from ray.train import TrainingFailedError
    from transformers import AutoModelForCausalLM

    from raylm.runs import claim_stage
    from raylm.storage import Location
    from raylm.train.checkpoint import checkpoint_problem, choose_checkpoint
    from raylm.train.trainer import build_trainer
    from tests.reliability import full_disk

    cloudpickle.register_pickle_by_value(full_disk)  # Ray's workers get the handler without importing tests/
    cfg = _config(tmp_path, "full", "train.num_workers=1", "train.max_steps=12", "train.max_failures=0")
    paths = RunPaths.of(cfg)
    claim_stage(cfg, "train", restart=False)
    full = Location(pafs.PyFileSystem(full_disk.FullDiskHandler()), paths.root.path)
    with pytest.raises(TrainingFailedError, match="No space left on device"):
        build_trainer(cfg, paths.data, full, "train", 1).fit()

    checkpoints = paths.train.glob("checkpoint_*")
    complete = [c for c in checkpoints if checkpoint_problem(c) is None]
    assert len(complete) == 1 and read_checkpoint_manifest(complete[0])["step"] == 4
    assert AutoModelForCausalLM.from_pretrained(str(complete[0].local)) is not None
    assert choose_checkpoint(paths.train)[0] == complete[0], "a partial checkpoint is never resumed from"

    summary = run_train(cfg, plan_resources(cfg, embedded=True))  # space again: the run resumes and finishes
    assert summary["resumed"] is True and summary["step"] == 12
    expected = expected_ledger(str(paths.data), 0, 8, 1, 0, 12).state()
    assert read_checkpoint_manifest(summary["checkpoint"])["ledgers"] == [expected]
