"""Model FLOPs utilisation of GPT-2 124M training on one GPU, and `raylm train` ÷ a bare loop on the same GPU (see
shared BENCHMARKS.md).

FLOPs per token = 6N + 12·L·d·T (N: parameters less the position embeddings; forward and backward, attention
included), against 989 TFLOP/s (H100 bf16 dense). Both sides: GPT-2 small (12 layers, d=768), T=1024, bf16
autocast, SDPA attention, fused AdamW, `torch.compile`, the same global and micro batch, on shards raylm
prepared from the standard library with a byte-level BPE of up to 50,257 tokens (no downloads; the vocabulary
reached is reported). Bare: a plain loop in this process, batches already on the GPU. Platform: `run_train` (Ray
Train, 1 GPU worker, Ray Data streaming the shards); its steady tokens/s comes from the per-step wall-clock times
in the run's metrics log, after the same warm-up steps (compilation) the bare loop skips.

    python bench/mfu.py            # 5 alternating measurements of 30 steps (bare) and one platform run
    python bench/mfu.py --quick    # fewer steps
    python bench/mfu.py --smoke    # CPU, tiny model, T=128: checks the code path only (no figure)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cluster import local_cores, plan_resources, ray_session
from raylm.config import Config, load_config
from raylm.data.prepare import run_prepare
from raylm.runs import RunPaths
from raylm.train.observe import read_metrics
from raylm.train.trainer import run_train

PEAK_FLOPS = 989e12  # H100 SXM, bf16 dense
TARGET_MFU, TARGET_RATIO = 0.40, 0.97


def flops_per_token(model, seq_len: int) -> float:
    config = model.config
    positions = model.transformer.wpe.weight.numel()  # a lookup, not a matmul
    n = sum(p.numel() for p in model.parameters()) - positions
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len


def bare_run(cfg: Config, data_dir: str, steps: int, warmup: int, repeats: int) -> tuple[list[float], float, dict]:
    """Tokens/s of a plain compiled bf16 loop (one figure per repeat), FLOPs per token, and model facts."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_float32_matmul_precision("high")

    from raylm.data.shards import read_manifest, read_split_blocks
    from raylm.models import build_model

    device = torch.device("cuda" if cfg.train.gpus_per_worker else "cpu")
    manifest = read_manifest(data_dir)
    tok, seq_len = manifest.tokenizer, manifest.seq_len
    blocks = torch.from_numpy(read_split_blocks(data_dir, "train").astype(np.int64)).to(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, seq_len, tok.eos_id, tok.pad_id).to(device)
    flops = flops_per_token(model, seq_len)
    facts = {"params": sum(p.numel() for p in model.parameters()), "vocab": tok.vocab_size, "seq_len": seq_len}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    micro, accum = cfg.train.micro_batch(1), cfg.train.grad_accum_steps(1)

    def lm_loss(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=x[:, :-1]).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    # Forward and loss compiled as one graph, as nanoGPT compiles a model whose forward returns the loss.
    loss_fn = torch.compile(lm_loss) if cfg.train.compile else lm_loss

    def step(index: int) -> None:
        for micro_step in range(accum):
            start = ((index * accum + micro_step) * micro) % (len(blocks) - micro)
            loss = loss_fn(blocks[start : start + micro]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a real loop logs its loss: one sync per step, as in raylm's loop

    for index in range(warmup):
        step(index)
    rates = []
    for repeat in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for index in range(steps):
            step(warmup + repeat * steps + index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * cfg.train.batch_size * seq_len / (time.perf_counter() - started))
    return rates, flops, facts


def platform_rate(cfg: Config, plan, warmup: int) -> tuple[float, dict]:
    """Steady tokens/s of `raylm train`: from step `warmup` to the last step, by the metrics log's wall clock."""
    summary = run_train(cfg, plan)
    # The last step evaluates and checkpoints: training steps only, as on the bare side.
    records = [r for r in read_metrics(RunPaths.of(cfg).train / "logs") if "val_loss" not in r]
    first, last = records[warmup - 1], records[-1]
    tokens = (last["step"] - first["step"]) * cfg.train.batch_size * cfg.data.seq_len
    return tokens / (last["time"] - first["time"]), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: check the code path")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-mfu-"))
    steps, warmup, repeats = (6, 3, 2) if args.smoke else (20, 15, 3) if args.quick else (30, 15, 5)
    shape = (
        ["model.preset=tiny", "data.seq_len=128", "data.max_bytes=1000000", "data.tokenizer.vocab_size=2048",
         "train.batch_size=8", "train.micro_batch_size=4", "train.precision=fp32"]
        if args.smoke
        else ["model.preset=gpt2-small", "data.seq_len=1024", "data.max_bytes=40000000",
              "data.tokenizer.vocab_size=50257", "data.tokenizer.sample_bytes=16000000", "model.vocab_multiple=128",
              "train.batch_size=64", "train.micro_batch_size=64", "train.precision=bf16", "train.compile=true",
              "train.gpus_per_worker=1"]
    )  # fmt: skip
    platform_steps = warmup + repeats * steps
    cfg = load_config(
        None,
        [
            f"run.dir={work}",
            "run.name=mfu",
            "data.source=stdlib",
            "data.val_fraction=0.01",
            *shape,
            "train.num_workers=1",
            "train.lr=6e-4",
            "train.warmup_steps=10",
            f"train.max_steps={platform_steps}",
            f"train.eval_every={platform_steps}",
        ],
    )
    import ray

    # No dashboard: a GPU image may lack its extra packages, and a single run needs no placement-group cleanup.
    cpus = plan_resources(cfg, embedded=True).cluster_cpus  # room for Ray Data beside the worker, as raylm plans
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    with ray_session(cfg) as plan:
        data_dir = run_prepare(cfg)["data_dir"]
        bare, flops, facts = bare_run(cfg, data_dir, steps, warmup, repeats)
        _free_gpu_memory()  # the bare model is gone: give its cached blocks back before the worker starts
        print(f"bare: {[round(r) for r in bare]} tok/s, {flops:.3g} FLOPs/token, {facts}", file=sys.stderr)
        platform, summary = platform_rate(cfg, plan, warmup)
    bare_rate = statistics.median(bare)
    mfu = platform * flops / PEAK_FLOPS
    ratio = platform / bare_rate
    print(
        json.dumps(
            {
                "bench": "mfu",
                "mfu": round(mfu, 4),
                "target": TARGET_MFU,
                "ratio": round(ratio, 3),
                "ratio_target": TARGET_RATIO,
                "pass": mfu >= TARGET_MFU and ratio >= TARGET_RATIO and not args.smoke,
                "bare_mfu": round(bare_rate * flops / PEAK_FLOPS, 4),
                "platform_tok_s": round(platform),
                "bare_tok_s": round(bare_rate),
                "flops_per_token": round(flops),
                **facts,
                "batch": cfg.train.batch_size,
                "micro_batch": cfg.train.micro_batch_size,
                "peak_gpu_mib": (summary.get("workers") or [{}])[0].get("peak_gpu_mib"),
                "steps": steps,
                "repeats": repeats,
                "spread": round((max(bare) - min(bare)) / bare_rate, 3),
                "device": _device_name(),
                "cores": local_cores(),
            }
        )
    )


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
