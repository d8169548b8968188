"""The training loop that runs on every Ray Train worker (DDP over gloo on CPU, NCCL on GPU).

Each optimizer step consumes the global `train.batch_size` sequences: every worker runs `grad_accum_steps` micro
batches of `micro_batch` sequences (gradients synchronised on the last one only), under bf16/fp16 autocast where
configured. Every `eval_every` steps, and at the end, all workers compute the validation loss over the whole
validation split and report it; rank 0 attaches a checkpoint and logs metrics. Every worker reports at the same
steps, so the reports (which are collective) line up. The worker count comes from Ray Train at start-up: with an
elastic `[min, max]` range a restart may bring another count, and the global batch is split over what there is.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raylm.config import Config, validate_config
from raylm.data.shards import TOKEN_COLUMN, read_manifest, read_split_blocks
from raylm.models import build_model
from raylm.redact import redact
from raylm.storage import Location
from raylm.train.checkpoint import checkpoint_problem, restore_checkpoint, save_checkpoint
from raylm.train.ingest import ROW_COLUMN, DataLedger, rank_dataset
from raylm.train.observe import LOGS_DIR, RunLogger, peak_gpu_mib, peak_rss_mib


def lm_loss(model, blocks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of blocks of `seq_len + 1` tokens (inputs are all but the last token)."""
    logits = model(input_ids=blocks[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1), reduction=reduction)


def warmup_cosine(warmup_steps: int, max_steps: int, floor: float = 0.1):
    """Learning-rate multiplier: linear warmup, then cosine decay to `floor` of the peak at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class MixedPrecision:
    """Autocast for the forward pass (weights, gradients and optimizer stay fp32) and, for fp16, a gradient scaler."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    name: str = "fp32"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def mixed_precision(precision: str, device: torch.device) -> MixedPrecision:
    """`train.precision` on this device: `auto` is bf16 on a GPU that supports it, else fp32."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return MixedPrecision(device.type, dtype, scaler, precision)


def train_batches(stream, micro_batch: int, device: torch.device) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(blocks, block ids) micro batches of the rank's stream, in order (a step's share is whole micro batches).
    Batches arrive on the CPU (pinned on GPU hosts) and only the tokens go to the device, without blocking: the
    block ids stay on the host for the ledger, so no device-to-host copy stalls the step."""
    cuda = device.type == "cuda"
    for batch in stream.iter_torch_batches(batch_size=micro_batch, prefetch_batches=8, device="cpu", pin_memory=cuda):
        yield batch[TOKEN_COLUMN].to(device=device, non_blocking=cuda).long(), batch[ROW_COLUMN].numpy()
    raise RuntimeError("the training stream ended before the last step")


@torch.no_grad()
def evaluate(
    model,
    share: torch.Tensor,
    batch_size: int,
    world_size: int = 1,
    amp: MixedPrecision | None = None,
) -> dict[str, float]:
    """Mean loss over every token of the validation split: each rank passes its disjoint `share` of the blocks
    (`val_share`), and the loss sums and token counts are all-reduced."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=share.device)
    for start in range(0, len(share), batch_size):
        batch = share[start : start + batch_size].long()
        with (amp or MixedPrecision()).autocast():
            sums[0] += lm_loss(model, batch, reduction="sum").item()
        sums[1] += batch[:, 1:].numel()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1].item())}


def val_share(data_dir: Location, rank: int, world_size: int) -> torch.Tensor:
    """This rank's validation blocks (every `world_size`-th from `rank`), kept in the shards' compact dtype: a
    rank holds 1/world of the split, read once and evaluated in place each time (re-streaming it through Ray Data
    per evaluation costs seconds each time)."""
    # A copy: the blocks come from Arrow's read-only buffers, which torch must not wrap (it warns, rightly).
    return torch.from_numpy(np.array(read_split_blocks(data_dir, "val")[rank::world_size]))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: Config = validate_config(config["cfg"])
    train = cfg.train
    data_dir: Location = config["data_dir"]
    run_dir: Location = config["run_dir"]
    torch.set_num_threads(config["threads"])
    # TF32 for whatever matmuls stay in fp32 on a GPU (the bf16 autocast path does not need it).
    torch.set_float32_matmul_precision("high")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    manifest = read_manifest(data_dir)
    tokenizer = manifest["tokenizer"]
    total_steps = train.total_steps(manifest["splits"]["train"]["blocks"])

    torch.manual_seed(train.seed)
    model = build_model(
        cfg.model, tokenizer["vocab_size"], manifest["seq_len"], tokenizer["eos_id"], tokenizer["pad_id"]
    ).to(device)  # before the optimizer exists, so that its state lives where the parameters do
    amp = mixed_precision(train.precision, device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train.lr,
        weight_decay=train.weight_decay,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",  # one kernel for the whole update on GPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, total_steps))
    position: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    ledger = DataLedger()
    source = _resume_source(config, ray.train.get_checkpoint())
    if source:
        local = source.local if source.is_local else source.download(Path(tempfile.mkdtemp(prefix="raylm-resume-")))
        recorded = restore_checkpoint(local, model, optimizer, scheduler, amp.scaler)
        position = {"step": recorded["step"], "tokens_seen": recorded["tokens_seen"]}
        ledgers = recorded.get("ledgers") or []
        # After an elastic resize the ranks read other slices: their ledgers start afresh.
        if len(ledgers) == world:
            ledger = DataLedger(**ledgers[rank])
    model = ray.train.torch.prepare_model(model)
    raw_model = getattr(model, "module", model)
    progress = _progress_actor(config.get("progress_actor")) if rank == 0 else None
    logger = _run_logger(cfg, run_dir) if rank == 0 else None

    # Compiled: the forward pass and the loss as one graph (the cross-entropy fuses with the logits instead of
    # materialising them in fp32). The module itself is untouched, so checkpoints stay plain HF directories, and
    # evaluation runs eagerly (no recompilation for eval mode or a short last batch).
    loss_fn = torch.compile(lm_loss) if train.compile else lm_loss
    micro, accum = train.micro_batch(world), train.grad_accum_steps(world)
    stream = rank_dataset(data_dir, train.seed, train.batch_size, world, rank, position["step"], total_steps)
    batches = train_batches(stream, micro, device)
    rows = manifest["splits"]["train"]["blocks"]
    val_blocks = val_share(data_dir, rank, world).to(device)
    tokens_per_step = train.batch_size * manifest["seq_len"]
    # Checkpoints carry the tokenizer; rank 0 keeps a local copy of it to add to each one.
    tokenizer_dir = (
        (data_dir / tokenizer["dir"]).download(Path(tempfile.mkdtemp(prefix="raylm-tok-"))) if rank == 0 else None
    )
    window = _RateWindow()
    while position["step"] < total_steps:
        loss, grad_norm, used = optimizer_step(
            model, optimizer, scheduler, batches, accum, train.grad_clip, amp, loss_fn
        )
        if not math.isfinite(loss):
            # Every later step would train on NaNs (and checkpoint them): stop, and keep the last good checkpoint.
            raise TrainingDiverged(
                f"training diverged: the loss is {loss} at step {position['step'] + 1} (train.lr={train.lr:g}); "
                "lower train.lr, raise train.warmup_steps or keep train.grad_clip on"
            )
        ledger.add(used)
        position["step"] += 1
        position["tokens_seen"] += tokens_per_step
        # Where the run stands in the data: resuming at this step continues exactly here.
        position["samples_consumed"] = position["step"] * train.batch_size
        position["epoch"] = position["samples_consumed"] // rows
        step = position["step"]
        metrics = {
            "step": step,
            "tokens_seen": position["tokens_seen"],
            "train_loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": window.rate(tokens_per_step),
        }
        evaluating = step % train.eval_every == 0 or step == total_steps
        if evaluating:
            metrics.update(evaluate(raw_model, val_blocks, micro, world, amp))
            workers = _gather(_worker_facts(rank, device, amp), world)
            metrics.update(_memory_metrics(workers))
            position["ledgers"] = _gather(ledger.state(), world)
            position["workers"] = workers
        if rank == 0:
            logger.log(step, metrics)
            if progress:
                progress.update.remote({**metrics, "total_steps": total_steps})
        if evaluating:
            if logger:
                logger.flush()
            _report(metrics, rank, raw_model, tokenizer_dir, optimizer, scheduler, position, amp.scaler)
            window.restart()  # evaluation and checkpointing are not training throughput
    if logger:
        logger.close()


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _RateWindow:
    """Training tokens/s since the last (re)start, excluding evaluation and checkpoint time."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.started, self.tokens = time.monotonic(), 0

    def rate(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(time.monotonic() - self.started, 1e-9)


def optimizer_step(
    model,
    optimizer,
    scheduler,
    batches,
    accum: int,
    grad_clip: float,
    amp: MixedPrecision | None = None,
    loss_fn=lm_loss,
) -> tuple[float, float, np.ndarray]:
    """One optimizer step over `accum` micro batches; returns the mean loss, the gradient norm before clipping and
    the ids of the blocks it used."""
    amp = amp or MixedPrecision()
    total = torch.zeros((), device=next(model.parameters()).device)
    rows = []
    for micro in range(accum):
        blocks, ids = next(batches)
        rows.append(ids)
        # Synchronise gradients across workers only on the last micro batch.
        sync = micro == accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with amp.autocast():
                loss = loss_fn(model, blocks) / accum
            (amp.scaler.scale(loss) if amp.scaler else loss).backward()
        total += loss.detach()
    if amp.scaler:
        amp.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if amp.scaler:
        amp.scaler.step(optimizer)
        amp.scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # One device sync per step, for both numbers.
    loss_value, norm_value = torch.stack([total, grad_norm.to(total.dtype)]).tolist()
    return loss_value, norm_value, np.concatenate(rows)


def _worker_facts(rank: int, device: torch.device, amp: MixedPrecision) -> dict[str, Any]:
    import ray

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


def _memory_metrics(workers: list[dict[str, Any]]) -> dict[str, float]:
    """Rank 0's peak memory as `peak_rss_mib` (and GPU), and every rank's as `rank<N>_peak_rss_mib`."""
    metrics: dict[str, float] = {"peak_rss_mib": workers[0]["peak_rss_mib"]}
    if workers[0]["peak_gpu_mib"] is not None:
        metrics["peak_gpu_mib"] = workers[0]["peak_gpu_mib"]
    for worker in workers:
        metrics[f"rank{worker['rank']}_peak_rss_mib"] = worker["peak_rss_mib"]
    return metrics


def _run_logger(cfg: Config, run_dir: Location) -> RunLogger:
    params = {f"train.{k}": v for k, v in cfg.train.model_dump(mode="json").items()}
    params.update({"model.preset": cfg.model.preset, "model.pretrained": cfg.model.pretrained})
    params = redact(params)  # MLflow stores its params: no tracking-URI password in them
    return RunLogger(run_dir / LOGS_DIR, cfg.train.tensorboard, cfg.train.mlflow_tracking_uri, cfg.run.name, params)


def _gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _report(metrics, rank, model, tokenizer_dir, optimizer, scheduler, position, scaler) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as directory:
        save_checkpoint(Path(directory), model, tokenizer_dir, optimizer, scheduler, position, metrics, scaler)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _resume_source(config: dict[str, Any], latest) -> Location | None:
    """The checkpoint the driver chose (hashed once, there), unless Ray Train hands over one this run reported after
    the driver chose (a restart after a worker failed), which is taken once its sizes check out."""
    if latest is not None:
        reported = Location(latest.filesystem, latest.path)
        if reported.name not in config["known_checkpoints"] and checkpoint_problem(reported) is None:
            return reported
    return config["resume_from"]


def _progress_actor(name: str | None):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None
