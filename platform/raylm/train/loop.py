"""The training loop that runs on every Ray Train worker (DDP over gloo on CPU, NCCL on GPU).

Each optimizer step consumes the global `train.batch_size` sequences: every worker runs `grad_accum_steps` micro
batches of `micro_batch` sequences (gradients synchronised on the last one only). Every `eval_every` steps, and at
the end, all workers compute the validation loss over the whole validation split and report it; rank 0 attaches a
checkpoint. Every worker reports at the same steps, so the reports (which are collective) line up.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raylm.config import Config, validate_config
from raylm.data.shards import TOKEN_COLUMN, read_manifest, read_split_blocks
from raylm.models import build_model
from raylm.storage import Location
from raylm.train.checkpoint import restore_checkpoint, resume_checkpoint, save_checkpoint
from raylm.train.ingest import ROW_COLUMN, DataLedger, rank_dataset


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


def _blocks(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    return batch[TOKEN_COLUMN].to(device=device, dtype=torch.long)


def train_batches(stream, micro_batch: int, device: torch.device) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(blocks, block ids) micro batches of the rank's stream, in order (a step's share is whole micro batches)."""
    for batch in stream.iter_torch_batches(batch_size=micro_batch, prefetch_batches=8):
        yield _blocks(batch, device), batch[ROW_COLUMN].numpy()
    raise RuntimeError("the training stream ended before max_steps")


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Mean loss over every token of the validation blocks: each rank takes a disjoint share, sums are all-reduced."""
    model.eval()
    mine = blocks[rank::world_size]
    sums = torch.zeros(2, dtype=torch.float64, device=blocks.device)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size].to(dtype=torch.long)
        sums[0] += lm_loss(model, batch, reduction="sum").item()
        sums[1] += batch[:, 1:].numel()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1].item())}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: Config = validate_config(config["cfg"])
    train = cfg.train
    data_dir = Location.parse(config["data_dir"])
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    manifest = read_manifest(data_dir)
    tokenizer = manifest["tokenizer"]

    torch.manual_seed(train.seed)
    model = build_model(
        cfg.model, tokenizer["vocab_size"], manifest["seq_len"], tokenizer["eos_id"], tokenizer["pad_id"]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, train.max_steps))
    position: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    ledger = DataLedger()
    latest = ray.train.get_checkpoint()
    source, warning = resume_checkpoint(
        Location(latest.filesystem, latest.path) if latest else None, Location.parse(config["run_dir"])
    )
    if warning:
        print(f"raylm: {warning}", file=sys.stderr, flush=True)
    if source:
        local = source.local if source.is_local else source.download(Path(tempfile.mkdtemp(prefix="raylm-resume-")))
        recorded = restore_checkpoint(local, model, optimizer, scheduler)
        position = {"step": recorded["step"], "tokens_seen": recorded["tokens_seen"]}
        ledgers = recorded.get("ledgers") or []
        if len(ledgers) == context.get_world_size():
            ledger = DataLedger(**ledgers[rank])
    model = ray.train.torch.prepare_model(model)
    raw_model = getattr(model, "module", model)
    progress = _progress_actor(config.get("progress_actor"))

    world = context.get_world_size()
    stream = rank_dataset(str(data_dir), train.seed, train.batch_size, world, rank, position["step"], train.max_steps)
    batches = train_batches(stream, train.micro_batch, device)
    rows = manifest["splits"]["train"]["blocks"]
    # The validation split is small next to the training set: every rank reads it once, keeps it in memory, and
    # evaluates its own share each time (re-streaming it through Ray Data per evaluation costs seconds each time).
    val_blocks = torch.from_numpy(read_split_blocks(data_dir, "val").astype("int64"))
    tokens_per_step = train.batch_size * manifest["seq_len"]
    started = time.monotonic()
    # Checkpoints carry the tokenizer; rank 0 keeps a local copy of it to add to each one.
    tokenizer_dir = (
        (data_dir / tokenizer["dir"]).download(Path(tempfile.mkdtemp(prefix="raylm-tok-"))) if rank == 0 else None
    )
    while position["step"] < train.max_steps:
        loss, used = optimizer_step(model, optimizer, scheduler, batches, train.grad_accum_steps, train.grad_clip)
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
        }
        if progress and rank == 0:
            elapsed = time.monotonic() - started
            progress.update.remote({**metrics, "tokens_per_s": position["tokens_seen"] / max(elapsed, 1e-9)})
        if step % train.eval_every == 0 or step == train.max_steps:
            metrics.update(evaluate(raw_model, val_blocks.to(device), train.micro_batch, rank, world))
            position["ledgers"] = _gather(ledger.state(), world)
            _report(metrics, rank, raw_model, tokenizer_dir, optimizer, scheduler, position)
            if progress and rank == 0:
                progress.update.remote(metrics)


def optimizer_step(model, optimizer, scheduler, batches, accum: int, grad_clip: float) -> tuple[float, np.ndarray]:
    """One optimizer step over `accum` micro batches; returns the mean loss and the ids of the blocks it used."""
    total, rows = 0.0, []
    for micro in range(accum):
        blocks, ids = next(batches)
        rows.append(ids)
        # Synchronise gradients across workers only on the last micro batch.
        sync = micro == accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            loss = lm_loss(model, blocks) / accum
            loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, np.concatenate(rows)


def _gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _report(metrics, rank, model, tokenizer_dir, optimizer, scheduler, position) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as directory:
        save_checkpoint(Path(directory), model, tokenizer_dir, optimizer, scheduler, position, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _progress_actor(name: str | None):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None
