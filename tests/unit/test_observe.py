"""Training observability files: TensorBoard events, metrics log, loss-curve PNG, peak memory (no Ray)."""

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raylm.storage import Location
from raylm.train.observe import LOSS_CURVE, RunLogger, peak_rss_mib, plot_loss_curve, read_metrics


def test_logger_writes_tensorboard_events_and_metrics_a_resumed_run_appends(tmp_path):
    logs = Location.parse(tmp_path / "logs")
    first = RunLogger(logs, tensorboard=True, mlflow_uri=None, run_name="r", params={})
    for step in (1, 2, 3):
        first.log(step, {"step": step, "train_loss": 5.0 - step, "lr": 0.1, "grad_norm": 1.5, "tokens_per_s": 100.0})
    first.log(2, {"val_loss": 3.5, "val_ppl": 33.1, "note": "strings are not metrics"})
    first.close()
    # A resumed attempt re-runs step 3 with another loss: the later value wins.
    second = RunLogger(logs, tensorboard=True, mlflow_uri=None, run_name="r", params={})
    second.log(3, {"train_loss": 1.75})
    second.log(4, {"train_loss": 1.5})
    second.close()

    records = read_metrics(logs)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["val_loss"] == 3.5 and records[1]["train_loss"] == 3.0
    assert records[2]["train_loss"] == 1.75 and "note" not in records[1]

    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(2, 3.5)]


def test_loss_curve_is_a_png(tmp_path):
    records = [{"step": s, "train_loss": 4.0 / s} for s in range(1, 11)] + [{"step": 10, "val_loss": 0.5}]
    target = Location.parse(tmp_path) / LOSS_CURVE
    plot_loss_curve(records, target, "test")
    data = (tmp_path / LOSS_CURVE).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_peak_rss_is_the_processes_high_water_mark():
    resident = _resident_mib()
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 300 MiB more resident
    peak = peak_rss_mib()
    assert peak >= resident + 250
    del ballast
    assert peak_rss_mib() == pytest.approx(peak, abs=50)  # a high-water mark: freeing does not lower it
