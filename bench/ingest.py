"""Tokens/s the training data iterator delivers from the shards ÷ tokens/s the training step consumes, and the
share of a training step spent waiting for data (see shared BENCHMARKS.md).

Everything runs inside one Ray Train worker, as `raylm train` runs: the blocks stream in through the rank's own
Ray Data pipeline in raylm's data order (`raylm.train.ingest`), and the step is raylm's own
(tiny GPT-2 preset, AdamW, the same micro batch and threads). Interleaved and repeated on one stream of several
epochs (as training reads it): an epoch's worth of batches pulled with no work between them, then 20 training
steps on a batch already in memory. Then a real training loop over 1.2 epochs records the time spent in
`next(batches)`.

    python bench/ingest.py            # demo corpus (2 MB of stdlib sources), 5 repeats
    python bench/ingest.py --quick    # 0.8 MB, 3 repeats
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
from raylm.config import load_config
from raylm.data.prepare import run_prepare

TARGET_RATIO = 3.0
TARGET_WAIT = 0.01


def bench_per_worker(config: dict) -> None:
    import torch

    from raylm.config import validate_config
    from raylm.data.shards import read_manifest
    from raylm.models import build_model
    from raylm.train.ingest import rank_dataset
    from raylm.train.loop import optimizer_step, train_batches

    cfg = validate_config(config["cfg"])
    torch.set_num_threads(config["threads"])
    manifest = read_manifest(Path(config["data_dir"]))
    tokens_per_row = manifest.seq_len
    tok = manifest.tokenizer
    model = build_model(cfg.model, tok.vocab_size, manifest.seq_len, tok.eos_id, tok.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    micro = cfg.train.micro_batch()
    tokens_per_batch = micro * tokens_per_row
    epoch_batches = manifest.train_blocks // micro
    # One stream, as in training (it holds several epochs): delivery windows and the real loop pull from it in turn.
    total_steps = (config["repeats"] + 2) * epoch_batches // cfg.train.grad_accum_steps() + 1
    stream = rank_dataset(config["data_dir"], cfg.train.seed, cfg.train.batch_size, 1, 0, 0, total_steps)
    batches = train_batches(stream, micro, torch.device("cpu"))
    in_memory = [next(batches)]  # also waits out the stream's start-up, which is not what is measured
    steady = iter(lambda: in_memory[0], None)
    optimizer_step(model, optimizer, scheduler, steady, cfg.train.grad_accum_steps(), cfg.train.grad_clip)
    iterate, train = [], []
    for _ in range(config["repeats"]):
        # Delivery: an epoch's worth of batches pulled with no work between them.
        started = time.perf_counter()
        for _ in range(epoch_batches):
            next(batches)
        iterate.append(epoch_batches * tokens_per_batch / (time.perf_counter() - started))
        # Consumption: the training step alone, on a batch already in memory.
        started = time.perf_counter()
        for _ in range(config["steps"]):
            optimizer_step(model, optimizer, scheduler, steady, 1, cfg.train.grad_clip)
        train.append(config["steps"] * tokens_per_batch / (time.perf_counter() - started))
    # Waiting: a real training loop over more than an epoch of the same stream, timing `next(batches)`.
    waited = 0.0

    class Timed:
        def __next__(self):
            nonlocal waited
            before = time.perf_counter()
            blocks = next(batches)
            waited += time.perf_counter() - before
            return blocks

    started = time.perf_counter()
    for _ in range(int(config["epoch_fraction"] * epoch_batches)):
        optimizer_step(model, optimizer, scheduler, Timed(), 1, cfg.train.grad_clip)
    waits = [waited / (time.perf_counter() - started)]
    Path(config["out"]).write_text(json.dumps({"iterate": iterate, "train": train, "waits": waits}))


def main() -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-ingest-"))
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml",
        [
            f"run.dir={work}",
            "run.name=ingest",
            *(["data.max_bytes=800000", "data.val_fraction=0.2"] if args.quick else []),
        ],
    )
    with ray_session(cfg):
        plan = plan_resources(cfg, embedded=True)
        summary = run_prepare(cfg)
        out = work / "result.json"
        trainer = TorchTrainer(
            bench_per_worker,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "data_dir": summary["data_dir"],
                "threads": plan.cpus_per_worker,
                "repeats": repeats,
                "steps": 20,
                "epoch_fraction": 1.2,
                "out": str(out),
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": plan.cpus_per_worker}),
            run_config=RunConfig(name="ingest", storage_path=str(work / "storage")),
        )
        trainer.fit()
    measured = json.loads(out.read_text())
    ratios = [i / t for i, t in zip(measured["iterate"], measured["train"], strict=True)]
    ratio, wait = statistics.median(ratios), measured["waits"][0]
    print(
        json.dumps(
            {
                "bench": "ingest",
                "ratio": round(ratio, 2),
                "target": TARGET_RATIO,
                "data_wait": round(wait, 4),
                "wait_target": TARGET_WAIT,
                "pass": ratio >= TARGET_RATIO and wait <= TARGET_WAIT,
                "iterator_tok_s": round(statistics.median(measured["iterate"])),
                "train_tok_s": round(statistics.median(measured["train"])),
                "micro_batch": cfg.train.micro_batch(),
                "seq_len": cfg.data.seq_len,
                "repeats": repeats,
                "spread": round((max(ratios) - min(ratios)) / ratio, 3),
                "wait_measured_over_steps": int(1.2 * (summary["train_blocks"] // cfg.train.micro_batch())),
                "cores": local_cores(),
            }
        )
    )


if __name__ == "__main__":
    main()
