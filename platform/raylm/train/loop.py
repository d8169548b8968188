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

from raylm.config import Config, validate_config
from raylm.data.shards import TOKEN_COLUMN, Manifest, read_manifest
from raylm.errors import RunError
from raylm.models import build_model
from raylm.storage import Location
from raylm.tasks import get_task
from raylm.tasks.causal_lm import lm_loss
from raylm.train.checkpoint import Position, checkpoint_dirs, checkpoint_problem, restore_checkpoint, save_checkpoint
from raylm.train.evaluate import MixedPrecision, evaluate, mixed_precision, val_share
from raylm.train.ingest import ROW_COLUMN, DataLedger, rank_dataset
from raylm.train.observe import memory_metrics, run_logger, worker_facts


def warmup_cosine(warmup_steps: int, max_steps: int, floor: float = 0.1):
    """Learning-rate multiplier: linear warmup, then cosine decay to `floor` of the peak at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return factor


def train_batches(stream, micro_batch: int, device: torch.device) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(blocks, block ids) micro batches of the rank's stream, in order (a step's share is whole micro batches).
    Batches arrive on the CPU (pinned on GPU hosts) and only the tokens go to the device, without blocking: the
    block ids stay on the host for the ledger, so no device-to-host copy stalls the step."""
    cuda = device.type == "cuda"
    for batch in stream.iter_torch_batches(batch_size=micro_batch, prefetch_batches=8, device="cpu", pin_memory=cuda):
        yield batch[TOKEN_COLUMN].to(device=device, non_blocking=cuda).long(), batch[ROW_COLUMN].numpy()
    raise RuntimeError("the training stream ended before the last step")


@dataclass
class WorkerRun:
    """One rank's training run, set up once: what every step, evaluation and checkpoint uses."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    manifest: Manifest
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp: MixedPrecision
    task: Any
    total_steps: int

    @property
    def raw_model(self):
        """The model without its DDP wrapper: what is evaluated and checkpointed."""
        return getattr(self.model, "module", self.model)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    run = _set_up_per_worker(config)
    position, ledger = _restore_per_worker(run, config, ray.train.get_checkpoint())
    run.model = ray.train.torch.prepare_model(run.model)
    _train_per_worker(run, config, position, ledger)


def _set_up_per_worker(config: dict[str, Any]) -> WorkerRun:
    import ray.train
    import ray.train.torch

    cfg: Config = validate_config(config["cfg"])
    train = cfg.train
    torch.set_num_threads(config["threads"])
    # TF32 for whatever matmuls stay in fp32 on a GPU (the bf16 autocast path does not need it).
    torch.set_float32_matmul_precision("high")
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    manifest = read_manifest(config["data_dir"])
    tokenizer = manifest.tokenizer
    total_steps = train.total_steps(manifest.train_blocks)
    torch.manual_seed(train.seed)
    model = build_model(cfg.model, tokenizer.vocab_size, manifest.seq_len, tokenizer.eos_id, tokenizer.pad_id).to(
        device
    )  # before the optimizer exists, so that its state lives where the parameters do
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train.lr,
        weight_decay=train.weight_decay,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",  # one kernel for the whole update on GPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, total_steps))
    amp = mixed_precision(train.precision, device)
    rank, world = context.get_world_rank(), context.get_world_size()
    return WorkerRun(cfg, rank, world, device, manifest, model, optimizer, scheduler, amp, get_task(), total_steps)


def _restore_per_worker(run: WorkerRun, config: dict[str, Any], latest) -> tuple[Position, DataLedger]:
    """The position and this rank's ledger to go on from: the chosen checkpoint's, loaded into the model,
    optimizer, scheduler and RNG, or a fresh start."""
    source = _resume_source(config, latest)
    if not source:
        return Position(), DataLedger()
    local = source.local if source.is_local else source.download(Path(tempfile.mkdtemp(prefix="raylm-resume-")))
    recorded = restore_checkpoint(local, run.model, run.optimizer, run.scheduler, run.amp.scaler)
    ledgers = recorded.get("ledgers") or []
    # After an elastic resize the ranks read other slices: their ledgers start afresh.
    ledger = DataLedger(**ledgers[run.rank]) if len(ledgers) == run.world else DataLedger()
    return Position.recorded(recorded), ledger


def _train_per_worker(run: WorkerRun, config: dict[str, Any], position: Position, ledger: DataLedger) -> None:
    train, data_dir, manifest = run.cfg.train, config["data_dir"], run.manifest
    logger = run_logger(run.cfg, config["run_dir"]) if run.rank == 0 else None
    board = _step_board(config.get("step_board")) if run.rank == 0 else None
    # Compiled: the forward pass and the loss as one graph (the cross-entropy fuses with the logits instead of
    # materialising them in fp32). The module itself is untouched, so checkpoints stay plain HF directories, and
    # evaluation runs eagerly (no recompilation for eval mode or a short last batch).
    loss_fn = torch.compile(run.task.loss) if train.compile else run.task.loss
    micro, accum = train.micro_batch(run.world), train.grad_accum_steps(run.world)
    stream = rank_dataset(data_dir, train.seed, train.batch_size, run.world, run.rank, position.step, run.total_steps)
    batches = train_batches(stream, micro, run.device)
    val_blocks = val_share(data_dir, run.rank, run.world).to(run.device)
    tokens_per_step = train.batch_size * manifest.seq_len
    # Checkpoints carry the tokenizer; rank 0 keeps a local copy of it to add to each one.
    tokenizer_dir = (
        (data_dir / manifest.tokenizer.dir).download(Path(tempfile.mkdtemp(prefix="raylm-tok-")))
        if run.rank == 0
        else None
    )
    window = _RateWindow()
    while position.step < run.total_steps:
        loss, grad_norm, used = optimizer_step(
            run.model, run.optimizer, run.scheduler, batches, accum, train.grad_clip, run.amp, loss_fn
        )
        if not math.isfinite(loss):
            # Every later step would train on NaNs (and checkpoint them): stop, and keep the last good checkpoint.
            raise TrainingDiverged(
                f"training diverged: the loss is {loss} at step {position.step + 1} (train.lr={train.lr:g}); "
                "lower train.lr, raise train.warmup_steps or keep train.grad_clip on"
            )
        ledger.add(used)
        position.advance(train.batch_size, tokens_per_step, manifest.train_blocks)
        metrics = {
            "step": position.step,
            "tokens_seen": position.tokens_seen,
            "train_loss": loss,
            "lr": run.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": window.rate(tokens_per_step),
        }
        evaluating = position.step % train.eval_every == 0 or position.step == run.total_steps
        if evaluating:
            metrics.update(evaluate(run.raw_model, val_blocks, micro, run.world, run.amp, run.task))
            position.workers = _gather(worker_facts(run.rank, run.device, run.amp), run.world)
            position.ledgers = _gather(ledger.state(), run.world)
            metrics.update(memory_metrics(position.workers))
        if logger:
            logger.log(position.step, metrics)
            if board:
                board.update.remote({**metrics, "total_steps": run.total_steps})
        if evaluating:
            if logger:
                logger.flush()
            _report(run, metrics, position, tokenizer_dir)
            window.restart()  # evaluation and checkpointing are not training throughput
    if logger:
        logger.close()


class TrainingDiverged(RunError):
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


def _gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _report(run: WorkerRun, metrics: dict[str, Any], position: Position, tokenizer_dir: Path | None) -> None:
    """Every rank reports (the reports are collective); rank 0 attaches the checkpoint."""
    import ray.train

    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as directory:
        save_checkpoint(
            Path(directory),
            run.raw_model,
            tokenizer_dir,
            run.optimizer,
            run.scheduler,
            position.record(),
            metrics,
            run.amp.scaler,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _resume_source(config: dict[str, Any], latest) -> Location | None:
    """The checkpoint the driver chose (hashed once, there), unless this run has reported newer ones since: after a
    worker failed, Ray Train restarts the group and hands over its latest (else the run's folder holds them), and
    those are taken once their sizes check out, newest first."""
    known = set(config["known_checkpoints"])
    reported = [Location(latest.filesystem, latest.path)] if latest is not None else []
    since = sorted((c for c in checkpoint_dirs(config["run_dir"]) if c.name not in known), key=lambda c: c.name)
    for candidate in [*reported, *reversed(since)]:
        if candidate.name not in known and checkpoint_problem(candidate) is None:
            return candidate
    return config["resume_from"]


def _step_board(name: str | None):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None
