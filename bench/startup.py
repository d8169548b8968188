"""Seconds from starting `raylm train` to its first optimizer step on an embedded Ray ÷ the same for a bare
1-worker `TorchTrainer` (see shared BENCHMARKS.md).

Both sides are fresh processes timed from their launch, so interpreter start, imports and `ray.init` count on both.
Platform: the `raylm train` CLI on the tiny config (shards prepared beforehand, as a user runs `raylm prepare`
once), 1 worker; the first step's wall-clock time is read from the run's metrics log. Peer: a script that starts
Ray, runs a `TorchTrainer` with 1 worker whose loop builds the same tiny model and takes one AdamW step on a
random batch of the same shape, and writes the time. A/B interleaved, repeated; medians.

    python bench/startup.py            # 5 repeats
    python bench/startup.py --quick    # 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.cluster import local_cores

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.2
CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"
RAYLM = [sys.executable, "-m", "raylm.cli"]

BARE_TRAINER = textwrap.dedent(
    """
    import sys, time
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import torch
        import torch.nn.functional as F
        from transformers import GPT2Config, GPT2LMHeadModel
        import ray.train.torch

        model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=128, n_layer=2, n_head=4, n_embd=128))
        model = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 2048, (16, 129))
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).backward()
        optimizer.step()
        with open(config["out"], "w") as f:
            f.write(str(time.time()))

    ray.init(logging_level="WARNING", log_to_driver=False)
    TorchTrainer(
        loop,
        train_loop_config={"out": sys.argv[1]},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="bare", storage_path=sys.argv[2]),
    ).fit()
    """
)


def platform_seconds(work: Path) -> float:
    started = time.time()
    subprocess.run(
        [*RAYLM, "train", "--config", str(CONFIG), "--restart", f"run.dir={work}", "run.name=startup",
         "train.max_steps=3", "train.eval_every=3"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    (first,) = (r for r in _records(work / "startup" / "train" / "logs" / "metrics.jsonl") if r["step"] == 1)
    return first["time"] - started


def bare_seconds(work: Path) -> float:
    out = work / "bare_first_step"
    started = time.time()
    subprocess.run(
        [sys.executable, "-c", BARE_TRAINER, str(out), str(work / "bare")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    return float(out.read_text()) - started


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "platform"), env.get("PYTHONPATH")]))
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-startup-"))
    subprocess.run(
        [*RAYLM, "prepare", "--config", str(CONFIG), f"run.dir={work}", "run.name=startup"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    platform, bare = [], []
    for repeat in range(repeats):
        platform.append(platform_seconds(work))
        bare.append(bare_seconds(work))
        print(f"repeat {repeat}: raylm train {platform[-1]:.1f} s, bare TorchTrainer {bare[-1]:.1f} s", file=sys.stderr)
    ratios = [p / b for p, b in zip(platform, bare, strict=True)]
    ratio = statistics.median(ratios)
    print(
        json.dumps(
            {
                "bench": "startup",
                "ratio": round(ratio, 3),
                "target": TARGET,
                "pass": ratio <= TARGET,
                "platform_s": round(statistics.median(platform), 2),
                "bare_s": round(statistics.median(bare), 2),
                "repeats": repeats,
                "spread": round((max(ratios) - min(ratios)) / ratio, 3),
                "cores": local_cores(),
            }
        )
    )


if __name__ == "__main__":
    main()
