"""The training step on one process: precision options, accumulation, gradient norm (no Ray)."""

import numpy as np
import pytest
import torch

from raylm.config import ModelSection
from raylm.models import build_model
from raylm.tasks.causal_lm import lm_loss
from raylm.train.evaluate import MixedPrecision, mixed_precision
from raylm.train.loop import optimizer_step, warmup_cosine


def _setup(seed: int = 0, optimizer=torch.optim.AdamW):
    torch.manual_seed(seed)
    model = build_model(ModelSection(preset="tiny"), vocab_size=300, seq_len=32, eos_id=0, pad_id=1)
    optimizer = optimizer(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 10))
    blocks = torch.randint(0, 300, (8, 33), generator=torch.Generator().manual_seed(seed))
    return model, optimizer, scheduler, blocks


def _micro_batches(blocks: torch.Tensor, size: int):
    for start in range(0, len(blocks), size):
        yield blocks[start : start + size], np.arange(start, start + size)


def test_auto_precision_is_fp32_on_cpu_and_fp16_brings_a_scaler():
    cpu = torch.device("cpu")
    assert mixed_precision("auto", cpu).dtype is None and mixed_precision("auto", cpu).name == "fp32"
    assert mixed_precision("bf16", cpu).dtype is torch.bfloat16 and mixed_precision("bf16", cpu).scaler is None
    fp16 = mixed_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and isinstance(fp16.scaler, torch.amp.GradScaler)


def test_accumulated_step_equals_one_big_batch():
    """4 micro batches of 2 give the same update as 1 batch of 8 (the loss is averaged over micro batches).
    SGD: its update is proportional to the gradient (Adam's sign-like first step amplifies rounding noise)."""
    model_a, opt_a, sched_a, blocks = _setup(optimizer=torch.optim.SGD)
    model_b, opt_b, sched_b, _ = _setup(optimizer=torch.optim.SGD)
    loss_a, norm_a, rows_a = optimizer_step(model_a, opt_a, sched_a, _micro_batches(blocks, 2), 4, 1.0)
    loss_b, norm_b, rows_b = optimizer_step(model_b, opt_b, sched_b, _micro_batches(blocks, 8), 1, 1.0)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4) and norm_a > 0
    assert rows_a.tolist() == rows_b.tolist() == list(range(8))
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p_a, p_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_and_stay_close_to_fp32(precision):
    model, optimizer, scheduler, blocks = _setup()
    amp = mixed_precision(precision, torch.device("cpu"))
    first = lm_loss(model, blocks).item()
    with amp.autocast():
        low = lm_loss(model, blocks).item()
    assert low == pytest.approx(first, rel=0.02)  # the same forward pass at lower precision
    for _ in range(5):
        loss, norm, _ = optimizer_step(model, optimizer, scheduler, _micro_batches(blocks, 4), 2, 1.0, amp)
        assert np.isfinite(loss) and np.isfinite(norm)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert lm_loss(model, blocks).item() < first - 0.05
    if amp.scaler is not None:
        assert amp.scaler.get_scale() > 0


def test_fp32_default_has_no_autocast():
    assert MixedPrecision().autocast().__class__.__name__ == "nullcontext"
