"""Time-to-best of a grid sweep ÷ time-to-best of ASHA over the same lr x batch-size space (see shared BENCHMARKS.md).

Time-to-best: wall-clock from the sweep's start until a trial first reports a validation loss within 1% of the best
validation loss EITHER sweep found (measured against its own best, a sweep that keeps a worse configuration would
reach "its best" sooner); a sweep that never gets there has none, and that repeat no ratio. `same_best` says
whether both sweeps chose the same configuration. There is no pass mark: with 9 configurations and reduction
factor 3, ASHA runs the first trial and every best-so-far to the end, which bounds the ratio well under 3x
(bench/README.md). Both sweeps try the same configurations in the same order (a seeded shuffle of the learning rates),
one trial at a time (`--concurrent N`: N at a time), each trial budgeted in tokens seen (a batch-size sweep gives
trials different step counts), validating at the same cadence; ASHA (reduction factor 3, grace = budget / 9)
stops the weak ones early. The two sweeps alternate (grid first, then ASHA first in the next repeat), each in a
fresh embedded Ray on all cores, and the best configurations they find must agree.

Also reported: `tokens_ratio`, the tokens all grid trials trained on ÷ those of ASHA's trials (the work ASHA
saves, before each trial's fixed start-up cost); `tune_overhead`, the grid sweep's wall time ÷ (the sum of its
trials' times ÷ concurrency); `grid_trial_s`, the mean time of a grid trial.

    python bench/tune.py            # 3 repeats (3 shuffles), 9 configurations, 1.2M tokens per trial
    python bench/tune.py --quick    # 1 repeat, 6 configurations, 150k tokens per trial
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from raylm.cluster import local_cores, ray_session  # noqa: E402
from raylm.config import load_config  # noqa: E402
from raylm.data.prepare import run_prepare  # noqa: E402
from raylm.runs import RunPaths  # noqa: E402
from raylm.storage import read_json  # noqa: E402
from raylm.tune.sweep import run_tune  # noqa: E402

WITHIN = 0.01  # "within 1% of the best either sweep found"


def sweep_overrides(
    work: Path, lrs: list[float], batch_sizes: list[int], budget: int, seq_len: int, extra: list[str]
) -> list[str]:
    space = {"train.lr": {"grid": lrs}, "train.batch_size": {"grid": batch_sizes}}
    return [
        *extra,
        f"run.dir={work}",
        "run.name=bench",
        f"data.seq_len={seq_len}",
        "train.num_workers=1",
        "train.warmup_steps=10",
        "train.max_failures=0",
        f"tune.space={json.dumps(space)}",
        "tune.num_samples=1",
        f"tune.budget_tokens={budget}",
        f"tune.eval_tokens={budget // 9}",
    ]


def run_one_sweep(overrides: list[str], scheduler: str, out: Path) -> None:
    """In a child process: one sweep on this process's cores; its timings and results go to `out`."""
    scheduler_spec = "grid" if scheduler == "grid" else "{asha: {reduction_factor: 3}}"
    cfg = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [*overrides, f"run.name=bench-{scheduler}", f"tune.scheduler={scheduler_spec}"],
    )
    with ray_session(cfg) as plan:
        started = time.time()
        summary = run_tune(cfg, plan, restart=True)
        wall = time.time() - started
    trials = read_json(RunPaths.of(cfg).tune / "results.json")["trials"]
    out.write_text(json.dumps({"started": started, "wall": wall, "summary": summary, "trials": trials}))


def time_to_best(sweep: dict, best: float) -> float | None:
    """Seconds from the sweep's start to its first validation within 1% of `best`; None if it never got there."""
    times = [p["time"] for t in sweep["trials"] for p in t["curve"] if p["val_loss"] <= best * (1 + WITHIN)]
    return min(times) - sweep["started"] if times else None


def trained_tokens(sweep: dict) -> int:
    """Tokens the sweep's trials trained on, all together (a stopped trial: up to its last validation)."""
    return sum(max((p["tokens_seen"] for p in t["curve"]), default=0) for t in sweep["trials"])


def run_sweeps(overrides: list[str], work: Path, order: list[str]) -> dict[str, dict]:
    """The sweeps one after the other (A/B, then B/A in the next repeat), each in a fresh child process with its own
    embedded Ray on all cores. Not side by side: with two Ray instances on one machine, Ray Train's placement-group
    cleaner cannot tell which one to ask about a stopped trial, and the stopped trial's CPUs are never given back."""
    results = {}
    for scheduler in order:
        out = work / f"{scheduler}.json"
        # Each sweep its own run (run.name), on a copy of the same shards.
        if not (work / f"bench-{scheduler}").exists():
            shutil.copytree(work / "bench" / "data", work / f"bench-{scheduler}" / "data")
        env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix=f"rl-{scheduler}-", dir="/tmp")}
        command = [sys.executable, __file__, "--child", scheduler, "--out", str(out), "--", *overrides]
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"the {scheduler} sweep failed")
        results[scheduler] = json.loads(out.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--budget", type=int, help="tokens per trial")
    parser.add_argument("--lrs", type=float, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--gpu", action="store_true", help="trials on one GPU each (train.gpus_per_worker=1)")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at a time, in both sweeps")
    parser.add_argument("--max-bytes", type=int, help="corpus size (data.max_bytes)")
    parser.add_argument("--child", choices=["grid", "asha"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one_sweep(args.overrides, args.child, args.out)
        return

    if args.quick:
        repeats, budget, lrs, batch_sizes, seq_len = 1, 150_000, [1e-3, 3e-3, 1e-2], [8, 16], 64
    else:
        repeats, budget, lrs, batch_sizes, seq_len = 3, 1_200_000, [5e-4, 2e-3, 8e-3], [8, 16, 32], 128
    repeats, budget = args.repeats or repeats, args.budget or budget
    lrs, batch_sizes, seq_len = args.lrs or lrs, args.batch_sizes or batch_sizes, args.seq_len or seq_len
    extra = ["train.gpus_per_worker=1"] if args.gpu else []
    extra += [f"data.max_bytes={args.max_bytes}"] if args.max_bytes else []
    extra += [f"tune.max_concurrent_trials={args.concurrent}"]
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-tune-"))
    base = sweep_overrides(work, lrs, batch_sizes, budget, seq_len, extra)
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", base)
    with ray_session(cfg):
        run_prepare(cfg)  # once: both sweeps (every trial) read the same shards

    ratios, overheads, runs = [], [], []
    for repeat in range(repeats):
        order = random.Random(repeat).sample(lrs, len(lrs))  # the same shuffled order for both sweeps
        schedulers = ["grid", "asha"] if repeat % 2 == 0 else ["asha", "grid"]
        sweeps = run_sweeps(sweep_overrides(work, order, batch_sizes, budget, seq_len, extra), work, schedulers)
        grid, asha = sweeps["grid"], sweeps["asha"]
        best = min(sweep["summary"]["val_loss"] for sweep in sweeps.values())  # the best either found
        ttb = {name: time_to_best(sweep, best) for name, sweep in sweeps.items()}
        ratio_here = ttb["grid"] / ttb["asha"] if ttb["grid"] and ttb["asha"] else None
        ratios.append(ratio_here)
        trial_seconds = [t["seconds"] for t in grid["trials"] if t["seconds"]]
        overheads.append(grid["wall"] / (sum(trial_seconds) / args.concurrent))
        trained = {name: trained_tokens(sweep) for name, sweep in sweeps.items()}
        runs.append(
            {
                "lr_order": order,
                "ratio": None if ratio_here is None else round(ratio_here, 3),
                "best_val_loss": round(best, 4),
                "grid_ttb_s": None if ttb["grid"] is None else round(ttb["grid"], 1),
                "asha_ttb_s": None if ttb["asha"] is None else round(ttb["asha"], 1),
                "grid_val_loss": round(grid["summary"]["val_loss"], 4),
                "asha_val_loss": round(asha["summary"]["val_loss"], 4),
                "grid_wall_s": round(grid["wall"], 1),
                "asha_wall_s": round(asha["wall"], 1),
                "grid_best": grid["summary"]["best_config"],
                "asha_best": asha["summary"]["best_config"],
                "asha_stopped": asha["summary"]["stopped_early"],
                "tokens_ratio": round(trained["grid"] / trained["asha"], 2),
                "grid_trial_s": round(statistics.mean(trial_seconds), 1),
            }
        )
        print(f"repeat {repeat}: {json.dumps(runs[-1])}", file=sys.stderr)
    measured = [r for r in ratios if r is not None]  # a repeat where a sweep never reached the best has none
    ratio = statistics.median(measured) if measured else None
    same_best = all(run["grid_best"] == run["asha_best"] for run in runs)
    middle = runs[ratios.index(ratio)] if ratio in ratios else runs[0]
    print(
        json.dumps(
            {
                "bench": "tune",
                "ratio": None if ratio is None else round(ratio, 3),
                "same_best": same_best,
                "repeats_reaching_best": len(measured),
                "best_val_loss": middle["best_val_loss"],
                "grid_val_loss": middle["grid_val_loss"],
                "asha_val_loss": middle["asha_val_loss"],
                "grid_ttb_s": middle["grid_ttb_s"],
                "asha_ttb_s": middle["asha_ttb_s"],
                "grid_wall_s": middle["grid_wall_s"],
                "asha_wall_s": middle["asha_wall_s"],
                "asha_stopped": middle["asha_stopped"],
                "tokens_ratio": middle["tokens_ratio"],
                "trials": len(lrs) * len(batch_sizes),
                "budget_tokens": budget,
                "grid_trial_s": middle["grid_trial_s"],
                "tune_overhead": round(statistics.median(overheads), 3),
                "repeats": repeats,
                "spread": round((max(measured) - min(measured)) / ratio, 3) if ratio else None,
                "cores": local_cores(),
                "device": "gpu" if args.gpu else "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
