"""Shared fixtures. Integration tests share one real local Ray cluster (ray.init takes ~9 s on 2 cores) and one
prepared tiny dataset; unit tests never start Ray.

Token authentication is on, with a token file of this test session's own (RAY_AUTH_TOKEN_PATH), so the outcome
never depends on ~/.ray/auth_token or on another session's cluster.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

_TOKEN_DIR = tempfile.mkdtemp(prefix="raylm-test-auth-")
_TOKEN_PATH = Path(_TOKEN_DIR) / "auth_token"
_TOKEN_PATH.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN_PATH)
os.environ.pop("RAY_ADDRESS", None)
# Nothing in the tests may download: a stray hub lookup fails fast instead of hanging on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("RAYLM_API_KEY", None)
# The S3 tests' server (moto, started by the tests) takes any credentials; set before Ray starts, so that its workers
# (a Serve replica reading the registry) have them too, as a cluster's nodes have theirs in their environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raylm-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raylm-test")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# MLflow tests log to a file store (no tracking server here); MLflow 3 wants this opt-in for it.
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

# A test suite started in the background of a non-interactive shell (`make test &`) inherits SIGINT ignored, and so
# would every CLI process the tests start and then Ctrl-C: give them the terminal's default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
TEST_CLUSTER_CPUS = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(run_dir: Path, name: str = "t") -> list[str]:
    """A config small enough that every stage runs in seconds: tiny corpus, tokenizer, model, steps."""
    return [
        f"run.dir={run_dir}",
        f"run.name={name}",
        f"data.paths=[{ASSETS / 'corpus.jsonl'}]",
        "data.format=jsonl",
        "data.seq_len=32",
        "data.val_fraction=0.1",
        "data.rows_per_shard=64",
        "data.tokenizer.vocab_size=320",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.max_steps=12",
        "train.eval_every=6",
    ]


def ignore_sigint() -> None:
    """What a non-interactive shell does to a job it starts in the background (`raylm serve ... &` in a script)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupt_cli(
    args: list[str], ready: Callable[[], bool], signal_name: str, exit_code: int, sigint_ignored: bool = False
) -> str:
    """`raylm <args>` in a process of its own (with its own embedded Ray), sent `signal_name` once `ready()`; it must
    exit with `exit_code` and say how to go on. `sigint_ignored` starts it as a script's background job. Returns what
    it printed on stderr."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rl-", dir="/tmp")}  # short: Ray's socket paths
    process = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=ignore_sigint if sigint_ignored else None,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
        if not ready():
            pytest.fail(f"raylm {args[0]} never got ready to interrupt: {process.stderr.read().decode()[-3000:]}")
        process.send_signal(getattr(signal, signal_name))
        code = process.wait(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = process.stderr.read().decode()
    assert code == exit_code, stderr[-3000:]
    assert "run the same command again to resume" in stderr
    return stderr


def register_untrained_model(cfg, data: dict, name: str, seed: int = 0, chat_template: str | None = None):
    """Register a model made the way training makes its checkpoints, without a Ray Train run (fast). The same seed
    makes the same weights, which the registry keeps as one version. `chat_template` is saved with its tokenizer."""
    import torch

    from raylm.models import build_model
    from raylm.registry.store import register
    from raylm.runs import RunPaths
    from raylm.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model(cfg.model, data["vocab_size"], cfg.data.seq_len, 0, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = Path(tempfile.mkdtemp(prefix="raylm-ckpt-"))
    tokenizer_dir = Path(data["data_dir"]) / "tokenizer"
    if chat_template is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.chat_template = chat_template
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="raylm-tokenizer-"))
        tokenizer.save_pretrained(tokenizer_dir)
    save_checkpoint(checkpoint, model, tokenizer_dir, optimizer, scheduler, {"step": 0, "tokens_seen": 0}, {})
    return register(RunPaths.of(cfg).registry, name, checkpoint, {})[0]


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: none on this machine (CPU CI skips the GPU paths; run them on a GPU host)")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for all integration tests, with more logical CPUs than cores (see DESIGN.md)."""
    import ray

    import raylm  # noqa: F401  (sets raylm's environment before ray is imported)
    from raylm.cluster import quiet_logging

    ray.init(num_cpus=TEST_CLUSTER_CPUS, include_dashboard=True, logging_level="WARNING", log_to_driver=False)
    quiet_logging(verbose=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy takes its port once per cluster: every test serving on the shared cluster uses this one."""
    return free_port()


@pytest.fixture(scope="session")
def prepared(ray_cluster, tmp_path_factory):
    """The tiny test corpus prepared once: (config, prepare summary)."""
    from raylm.config import load_config
    from raylm.data.prepare import run_prepare

    cfg = load_config(None, tiny_overrides(tmp_path_factory.mktemp("runs")))
    return cfg, run_prepare(cfg)
