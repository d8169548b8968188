"""The GPU paths of training: bf16 autocast, fused AdamW, torch.compile, NCCL, peak GPU memory. Skipped (with the
reason) where there is no CUDA GPU; run them on one with `pytest -m gpu`."""

import math

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def test_bf16_fused_adamw_compiled_step_and_exact_restore(tmp_path):
    import numpy as np
    import torch

    from raylm.config import ModelSection
    from raylm.models import build_model
    from raylm.tasks.causal_lm import lm_loss
    from raylm.train.checkpoint import restore_checkpoint, save_checkpoint
    from raylm.train.evaluate import mixed_precision
    from raylm.train.loop import optimizer_step, warmup_cosine

    device = torch.device("cuda")
    amp = mixed_precision("auto", device)
    assert amp.dtype is torch.bfloat16 and amp.scaler is None

    def fresh():
        torch.manual_seed(0)
        model = build_model(ModelSection(preset="tiny"), 512, 64, 0, 1).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 50))
        return model, optimizer, scheduler

    model, optimizer, scheduler = fresh()
    assert optimizer.defaults["fused"]
    compiled = torch.compile(lm_loss)  # what the loop runs with train.compile
    blocks = torch.randint(0, 512, (16, 65), device=device, generator=torch.Generator(device).manual_seed(1))

    def batches():
        while True:
            yield blocks[:8], np.arange(8)
            yield blocks[8:], np.arange(8, 16)

    first = lm_loss(model, blocks).item()
    stream = batches()
    for _ in range(20):
        loss, norm, _ = optimizer_step(model, optimizer, scheduler, stream, 2, 1.0, amp, compiled)
        assert math.isfinite(loss) and math.isfinite(norm)
    assert loss < first - 1.0
    # The module is not wrapped: the state dict keeps plain names, so the checkpoint is a plain HF directory.
    assert not any("_orig_mod" in name for name in model.state_dict())

    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir, optimizer, scheduler, {"step": 20, "tokens_seen": 0}, {})
    restored, restored_opt, restored_sched = fresh()
    restore_checkpoint(tmp_path / "ckpt", restored, restored_opt, restored_sched)
    assert all(s["exp_avg"].device.type == "cuda" for s in restored_opt.state.values())
    # The next step from the checkpoint matches the next step of the run it came from.
    torch.manual_seed(5)
    expected, _, _ = optimizer_step(model, optimizer, scheduler, batches(), 2, 1.0, amp, compiled)
    torch.manual_seed(5)
    resumed, _, _ = optimizer_step(restored, restored_opt, restored_sched, batches(), 2, 1.0, amp)
    assert resumed == pytest.approx(expected, rel=2e-2)  # compiled vs eager kernels under bf16


def test_raylm_train_on_a_gpu_worker_with_nccl(tmp_path):
    import ray

    from raylm.cluster import plan_resources
    from raylm.config import load_config
    from raylm.data.prepare import run_prepare
    from raylm.train.trainer import run_train
    from tests.conftest import tiny_overrides

    cfg = load_config(
        None, [*tiny_overrides(tmp_path, "gpu"), "train.gpus_per_worker=1", "train.max_steps=20", "train.compile=true"]
    )
    if not ray.is_initialized():
        ray.init(num_cpus=plan_resources(cfg, embedded=True).cluster_cpus, include_dashboard=False)
    data = run_prepare(cfg)
    summary = run_train(cfg, plan_resources(cfg, embedded=True))
    (worker,) = summary["workers"]
    assert worker["device"].startswith("cuda") and worker["backend"] == "nccl"
    assert worker["peak_gpu_mib"] > 0
    assert worker["precision"] == "bf16"  # auto, on a GPU that has bf16
    assert summary["step"] == 20 and summary["val_loss"] < math.log(data["vocab_size"]) - 0.5
