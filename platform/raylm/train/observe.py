"""What a training run leaves behind to look at, under its `logs/` directory.

    events.out.tfevents.*   TensorBoard: train/val loss, lr, tokens/s, grad norm, peak memory (`tensorboard --logdir`)
    metrics.jsonl           the same metrics with the wall-clock time, one JSON object per step (the PNG's source)
    loss_curve.png          train and validation loss against steps, drawn by the driver when the run ends

Rank 0 writes them. On a remote `run.dir` they are written locally and uploaded at every checkpoint. A resumed run
appends: for a step logged twice (after a failure) the later line wins.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from raylm.config import Config
from raylm.redact import redact
from raylm.storage import Location

LOGS_DIR = "logs"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
# Metric name -> TensorBoard tag: grouped so TensorBoard shows train, val and system panels.
TENSORBOARD_TAGS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "grad_norm": "train/grad_norm",
    "val_loss": "val/loss",
    "val_ppl": "val/perplexity",
    "peak_rss_mib": "system/peak_rss_mib",
    "peak_gpu_mib": "system/peak_gpu_mib",
}


def peak_rss_mib() -> float:
    """This process's peak resident memory (the kernel's high-water mark), in MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def peak_gpu_mib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class RunLogger:
    """Rank 0's metric sinks: TensorBoard, the JSON-lines log, and MLflow when a tracking URI is configured."""

    def __init__(
        self, logs: Location, tensorboard: bool, mlflow_uri: str | None, run_name: str, params: dict[str, Any]
    ) -> None:
        self.logs = logs
        if logs.is_local:
            self.local = logs.local
        else:  # continue the remote logs of an earlier attempt
            self.local = Path(tempfile.mkdtemp(prefix="raylm-logs-"))
            if logs.is_dir():
                logs.download(self.local)
        self.local.mkdir(parents=True, exist_ok=True)
        self.metrics = (self.local / METRICS_FILE).open("a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # A suffix per attempt: tensorboardX names files by the second and host, and a restart within the same
            # second would otherwise truncate the earlier attempt's file.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self.writer = SummaryWriter(logdir=str(self.local), flush_secs=30, filename_suffix=suffix)
        self.mlflow = None
        if mlflow_uri:
            self.mlflow = _start_mlflow(mlflow_uri, run_name, params)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "step"}
        self.metrics.write(json.dumps({"step": step, "time": round(time.time(), 3), **numbers}) + "\n")
        if self.writer is not None:
            for name, value in numbers.items():
                if name in TENSORBOARD_TAGS:
                    self.writer.add_scalar(TENSORBOARD_TAGS[name], value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)

    def flush(self) -> None:
        self.metrics.flush()
        if self.writer is not None:
            self.writer.flush()
        if not self.logs.is_local:
            self.logs.upload(self.local)

    def close(self) -> None:
        self.flush()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _start_mlflow(uri: str, run_name: str, params: dict[str, Any]):
    try:
        import mlflow
    except ImportError:
        raise RuntimeError(
            "train.mlflow_tracking_uri is set but MLflow is not installed: pip install 'raylm[mlflow]'"
        ) from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(run_name)
    mlflow.start_run(run_name=run_name)
    mlflow.log_params(params)
    return mlflow


def read_metrics(logs: Location) -> list[dict[str, Any]]:
    """The run's metrics per step, in step order (a step logged by several attempts: later values win)."""
    path = logs / METRICS_FILE
    if not path.is_file():
        return []
    steps: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record)
    return [steps[step] for step in sorted(steps)]


def plot_loss_curve(records: list[dict[str, Any]], target: Location, title: str) -> None:
    """Train loss (every step) and validation loss (where evaluated) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, target)


def save_figure(fig, target: Location) -> None:
    """A matplotlib figure as a PNG at `target` (any filesystem), and the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    target.write_bytes(buffer.getvalue())
    plt.close(fig)


def worker_facts(rank: int, device, amp) -> dict[str, Any]:
    """What a rank reports of itself at each evaluation: where it runs, how, and its peak memory so far."""
    import ray
    import torch

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {
        "rank": rank,
        "node": ray.get_runtime_context().get_node_id()[:12],
        "device": str(device),
        "precision": amp.name,
        "backend": torch.distributed.get_backend() if distributed else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_gpu_mib": None if (gpu := peak_gpu_mib(device)) is None else round(gpu, 1),
    }


def memory_metrics(workers: list[dict[str, Any]]) -> dict[str, float]:
    """Rank 0's peak memory as `peak_rss_mib` (and GPU), and every rank's as `rank<N>_peak_rss_mib`."""
    metrics: dict[str, float] = {"peak_rss_mib": workers[0]["peak_rss_mib"]}
    if workers[0]["peak_gpu_mib"] is not None:
        metrics["peak_gpu_mib"] = workers[0]["peak_gpu_mib"]
    for worker in workers:
        metrics[f"rank{worker['rank']}_peak_rss_mib"] = worker["peak_rss_mib"]
    return metrics


def run_logger(cfg: Config, run_dir: Location) -> RunLogger:
    params = {f"train.{k}": v for k, v in cfg.train.model_dump(mode="json").items()}
    params.update({"model.preset": cfg.model.preset, "model.pretrained": cfg.model.pretrained})
    params = redact(params)  # MLflow stores its params: no tracking-URI password in them
    return RunLogger(run_dir / LOGS_DIR, cfg.train.tensorboard, cfg.train.mlflow_tracking_uri, cfg.run.name, params)
