"""Steady-state training tokens/s through `raylm train` ÷ a bare single-process torch loop (see shared
BENCHMARKS.md).

Platform: `run_train`, what `raylm train` runs: Ray Train with 1 worker on an embedded cluster, blocks streamed
from the shards by Ray Data in raylm's order, progress actor, TensorBoard and metrics log on. Its throughput is
read from the run's metrics log: the training tokens/s of each window between evaluations (start-up, evaluation
and checkpointing excluded), the first window (warm-up) dropped, the median taken.
Peer: a plain torch loop in this process over the same shards held in memory: the same model (tiny preset, same
seed), global batch, AdamW, warmup-cosine schedule, gradient clipping and torch threads. A/B interleaved, repeated.

    python bench/train_overhead.py            # 5 repeats of 250 steps each side
    python bench/train_overhead.py --quick    # 3 repeats of 125 steps
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

from raylm.cluster import local_cores, ray_session
from raylm.config import Config, load_config
from raylm.data.prepare import run_prepare
from raylm.runs import RunPaths
from raylm.train.observe import read_metrics
from raylm.train.trainer import run_train

TARGET = 0.95
WINDOWS = 5


def platform_tokens_per_s(cfg: Config, plan, steps: int) -> float:
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"max_steps": steps, "eval_every": steps // WINDOWS})}
    )
    # Each repeat trains the same run afresh on the shards prepared once (`--restart` discards only the training).
    run_train(cfg, plan, restart=True)
    windows = [r["tokens_per_s"] for r in read_metrics(RunPaths.of(cfg).train / "logs") if "val_loss" in r]
    return statistics.median(windows[1:])


def bare_tokens_per_s(cfg: Config, data_dir: str, threads: int, steps: int) -> float:
    """The loop a user would write by hand: no Ray, batches already in memory."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from raylm.data.shards import read_manifest, read_split_blocks
    from raylm.models import build_model
    from raylm.train.loop import warmup_cosine

    torch.set_num_threads(threads)
    manifest = read_manifest(data_dir)
    tok = manifest.tokenizer
    blocks = torch.from_numpy(read_split_blocks(data_dir, "train").astype(np.int64))
    train = cfg.train
    torch.manual_seed(train.seed)
    model = build_model(cfg.model, tok.vocab_size, manifest.seq_len, tok.eos_id, tok.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train.warmup_steps, steps))
    order = torch.randperm(len(blocks))
    batch = train.batch_size
    warmup = max(5, steps // WINDOWS)
    for step in range(steps + warmup):
        if step == warmup:
            started = time.perf_counter()
        rows = order[(step * batch) % (len(blocks) - batch) :][:batch]
        x = blocks[rows]
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        assert math.isfinite(loss.item())  # a .item() per step, as a real loop logs its loss
    return steps * batch * manifest.seq_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, steps = (3, 125) if args.quick else (5, 250)
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-overhead-"))
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml",
        [f"run.dir={work}", "run.name=overhead", "train.num_workers=1"],
    )
    platform, bare = [], []
    with ray_session(cfg) as plan:
        data_dir = run_prepare(cfg)["data_dir"]
        for repeat in range(repeats):
            platform.append(platform_tokens_per_s(cfg, plan, steps))
            bare.append(bare_tokens_per_s(cfg, data_dir, plan.cpus_per_worker, steps))
            print(f"repeat {repeat}: platform {platform[-1]:,.0f} tok/s, bare {bare[-1]:,.0f} tok/s", file=sys.stderr)
    ratios = [p / b for p, b in zip(platform, bare, strict=True)]
    ratio = statistics.median(ratios)
    print(
        json.dumps(
            {
                "bench": "train_overhead",
                "ratio": round(ratio, 3),
                "target": TARGET,
                "pass": ratio >= TARGET,
                "platform_tok_s": round(statistics.median(platform)),
                "bare_tok_s": round(statistics.median(bare)),
                "step_ms": round(1000 * cfg.train.batch_size * cfg.data.seq_len / statistics.median(bare), 1),
                "batch": cfg.train.batch_size,
                "seq_len": cfg.data.seq_len,
                "threads": plan.cpus_per_worker,
                "steps": steps,
                "repeats": repeats,
                "spread": round((max(ratios) - min(ratios)) / ratio, 3),
                "cores": local_cores(),
            }
        )
    )


if __name__ == "__main__":
    main()
