"""train with 2 real Ray Train workers (DDP over gloo) on the prepared shards."""

import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raylm.cluster import plan_resources
from raylm.data.prepare import run_prepare
from raylm.runs import RunPaths
from raylm.train.checkpoint import read_checkpoint_manifest
from raylm.train.ingest import expected_ledger
from raylm.train.observe import read_metrics
from raylm.train.trainer import run_train
from tests.conftest import interrupt_cli, tiny_overrides

pytestmark = pytest.mark.timeout(420)


def test_two_workers_loss_falls_and_checkpoint_loads(prepared):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, data = prepared
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 2})})
    plan = plan_resources(cfg, embedded=True)
    summary = run_train(cfg, plan)

    assert summary["step"] == cfg.train.max_steps
    assert summary["tokens_seen"] == cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len
    # An untrained model scores about ln(vocab); a dozen steps on this tiny corpus must do clearly better.
    assert summary["val_loss"] < math.log(data["vocab_size"]) - 0.5
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)

    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "raylm_checkpoint.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tokenizer("The river carried", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    # Each rank trained on exactly its slice of every global batch, in raylm's order.
    ledgers = read_checkpoint_manifest(checkpoint)["ledgers"]
    for rank in range(2):
        expected = expected_ledger(data["data_dir"], cfg.train.seed, cfg.train.batch_size, 2, rank, cfg.train.max_steps)
        assert ledgers[rank] == expected.state()
    assert summary["samples_consumed"] == cfg.train.max_steps * cfg.train.batch_size

    # Observability: every worker's peak memory, TensorBoard events, a metrics log and a loss curve.
    assert [w["rank"] for w in summary["workers"]] == [0, 1]
    assert all(100 < w["peak_rss_mib"] < 8000 and w["peak_gpu_mib"] is None for w in summary["workers"])
    logs = RunPaths.of(cfg).train.local / "logs"
    events = EventAccumulator(str(logs))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, cfg.train.max_steps + 1))
    assert [e.step for e in events.Scalars("val/loss")] == [6, 12]
    assert events.Scalars("val/loss")[-1].value == pytest.approx(summary["val_loss"], rel=1e-5)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "system/peak_rss_mib"} <= set(events.Tags()["scalars"])
    records = read_metrics(RunPaths.of(cfg).train / "logs")
    assert records[-1]["rank1_peak_rss_mib"] == summary["workers"][1]["peak_rss_mib"]
    assert Path(summary["loss_curve"]).read_bytes()[:4] == b"\x89PNG"

    # Running the same run again reuses the finished result instead of training again.
    assert run_train(cfg, plan) == summary
    assert (RunPaths.of(cfg).train / "result.json").is_file()


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_last_checkpoint(prepared, tmp_path):
    """Ctrl-C a `raylm train` process after its first checkpoint, then SIGTERM (what `ray job stop` sends) the same
    command run again after its next one; each time it stops cleanly, and the same command again finishes the run."""
    from raylm.config import load_config

    cfg, _ = prepared
    overrides = [*tiny_overrides(tmp_path, name="interrupted"), "train.max_steps=20", "train.eval_every=5"]
    resumed_cfg = load_config(None, overrides)
    run_prepare(resumed_cfg)
    train_dir = RunPaths.of(resumed_cfg).train

    stderr = _interrupt_training(overrides, train_dir, "SIGINT", 130)
    # The driver's progress line, fed by rank 0: steps, losses, throughput, time left; then how to go on.
    assert re.search(r"train .*\d+/20 .*loss \d+\.\d+ .*val \d+\.\d+ \(ppl .*tok/s.*eta", stderr), stderr
    # SIGTERM to a run started as a script's background job (SIGINT ignored): it must still stop, and resume.
    stderr = _interrupt_training(overrides, train_dir, "SIGTERM", 143, sigint_ignored=True)
    assert "(resuming from the last checkpoint)" in stderr, stderr[-3000:]

    summary = run_train(resumed_cfg, plan_resources(resumed_cfg, embedded=True))
    assert summary["resumed"] is True
    assert summary["step"] == 20
    # No block skipped, none trained on twice: the twice resumed run's ledger is the uninterrupted one's.
    data_dir = str(RunPaths.of(resumed_cfg).data)
    expected = expected_ledger(data_dir, resumed_cfg.train.seed, resumed_cfg.train.batch_size, 1, 0, 20)
    assert read_checkpoint_manifest(summary["checkpoint"])["ledgers"] == [expected.state()]
    assert summary["tokens_seen"] == 20 * cfg.train.batch_size * cfg.data.seq_len


def _interrupt_training(
    overrides: list[str], train_dir, signal_name: str, exit_code: int, sigint_ignored: bool = False
) -> str:
    """`raylm train`, sent `signal_name` once it has written a checkpoint (a new one, when resumed); no result is
    left. Returns what it printed."""
    before = {path.name for path in train_dir.glob("checkpoint_*")}

    def checkpointed() -> bool:
        return bool({path.name for path in train_dir.glob("checkpoint_*")} - before)

    stderr = interrupt_cli(["train", *overrides], checkpointed, signal_name, exit_code, sigint_ignored)
    assert not (train_dir / "result.json").exists()
    return stderr


@pytest.mark.slow
def test_two_workers_match_one_worker_at_the_same_global_batch(ray_cluster, tmp_path):
    from raylm.config import load_config

    losses = {}
    for workers in (1, 2):
        cfg = load_config(
            None,
            [
                *tiny_overrides(tmp_path, name=f"parity{workers}"),
                f"train.num_workers={workers}",
                "train.max_steps=50",
                "train.eval_every=50",
            ],
        )
        run_prepare(cfg)
        losses[workers] = run_train(cfg, plan_resources(cfg, embedded=True))["val_loss"]
    print(f"validation loss after 50 steps: 1 worker {losses[1]:.5f}, 2 workers {losses[2]:.5f}")
    assert abs(losses[2] - losses[1]) <= 0.01 * losses[1], losses


def test_more_workers_than_the_cluster_can_place_fail_fast(prepared):
    import time

    from raylm.nodes import UnplaceableError

    cfg, _ = prepared
    big = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 64, "batch_size": 64})})
    started = time.monotonic()
    with pytest.raises(UnplaceableError, match=r"train.num_workers=64 x 1 CPUs = 64 CPUs, but the cluster has 6"):
        run_train(big, plan_resources(big, embedded=True))
    gpu = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gpus_per_worker": 1.0})})
    with pytest.raises(UnplaceableError, match=r"train.gpus_per_worker=1 GPUs, but the cluster has 0 GPUs"):
        run_train(gpu, plan_resources(gpu, embedded=True))
    assert time.monotonic() - started < 10
