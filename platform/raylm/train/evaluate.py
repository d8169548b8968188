"""Evaluation, the one module both the training loop (on every worker) and the eval gate (on the driver) use:
mixed precision, the rank's validation share, and the task's metrics over the whole split."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from raylm.data.shards import read_split_blocks
from raylm.storage import Location
from raylm.tasks import get_task
from raylm.tasks.causal_lm import perplexity

__all__ = ["MixedPrecision", "evaluate", "mixed_precision", "perplexity", "val_share"]


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


@torch.no_grad()
def evaluate(
    model,
    share: torch.Tensor,
    batch_size: int,
    world_size: int = 1,
    amp: MixedPrecision | None = None,
    task=None,
) -> dict[str, float]:
    """The task's validation metrics over the whole split: each rank passes its disjoint `share` of the blocks
    (`val_share`), and the task's sums (for a causal LM: loss summed over tokens, and tokens) are all-reduced, so
    the result is the split's, not an average of ranks."""
    task = task or get_task()
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=share.device)
    for start in range(0, len(share), batch_size):
        batch = share[start : start + batch_size].long()
        with (amp or MixedPrecision()).autocast():
            sums += task.eval_sums(model, batch)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    return task.metrics(sums)


def val_share(data_dir: Location, rank: int, world_size: int) -> torch.Tensor:
    """This rank's validation blocks (every `world_size`-th from `rank`), kept in the shards' compact dtype: a
    rank holds 1/world of the split, read once and evaluated in place each time (re-streaming it through Ray Data
    per evaluation costs seconds each time)."""
    # A copy: the blocks come from Arrow's read-only buffers, which torch must not wrap (it warns, rightly).
    return torch.from_numpy(np.array(read_split_blocks(data_dir, "val")[rank::world_size]))
