"""The `raylm` command as users run it: a separate process, JSON on stdout, progress on stderr, clean Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from raylm.config import load_config
from tests.conftest import REPO, free_port, register_untrained_model, tiny_overrides

pytestmark = pytest.mark.timeout(300)
RAYLM = [sys.executable, "-m", "raylm.cli"]


def test_prepare_connects_to_a_running_cluster(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    result = subprocess.run(
        [*RAYLM, "prepare", "--address", address, *tiny_overrides(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    summary = json.loads(line)
    assert summary["stage"] == "prepare" and summary["documents"] == 238
    assert Path(summary["manifest"]).is_file()
    assert "tokenize + pack" in result.stderr


def test_changed_config_is_refused_before_connecting(prepared):
    cfg, _ = prepared
    # The same run (directory and name) as the prepared fixture, with one key changed.
    result = subprocess.run(
        [*RAYLM, "prepare", "--address", "127.0.0.1:1", *tiny_overrides(Path(cfg.run.dir)), "data.seq_len=48"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "data.seq_len: 32 -> 48" in result.stderr and "--restart" in result.stderr


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal_name", "exit_code", "sigint_ignored"),
    [
        ("SIGINT", 130, False),
        # `raylm serve ... &` in a script starts with SIGINT ignored: `kill` (SIGTERM) must still stop it.
        ("SIGTERM", 143, True),
    ],
)
def test_serve_answers_then_a_stop_signal_leaves_nothing_behind(prepared, signal_name, exit_code, sigint_ignored):
    from tests.conftest import ignore_sigint

    cfg, data = prepared
    port = free_port()
    serve_cfg = load_config(None, [*tiny_overrides(Path(cfg.run.dir)), "registry.name=cli", f"serve.port={port}"])
    register_untrained_model(serve_cfg, data, "cli")
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    process = subprocess.Popen(
        [*RAYLM, "serve", *tiny_overrides(Path(cfg.run.dir)), "registry.name=cli", f"serve.port={port}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=ignore_sigint if sigint_ignored else None,
    )
    try:
        line = process.stdout.readline()
        summary = json.loads(line)
        assert summary["url"] == f"http://127.0.0.1:{port}" and summary["model"] == "cli"
        reply = httpx.post(f"{summary['url']}/v1/completions", json={"prompt": "The", "max_tokens": 3}, timeout=60)
        assert reply.status_code == 200
        assert _processes_mentioning(ray_tmp), "the embedded cluster runs under RAY_TMPDIR"

        process.send_signal(getattr(signal, signal_name))
        assert process.wait(timeout=60) == exit_code
        deadline = time.monotonic() + 30
        while _processes_mentioning(ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        assert _processes_mentioning(ray_tmp) == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{summary['url']}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_doctor_exits_1_naming_the_failed_check(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    (tmp_path / "a-file").write_text("not a directory")
    bad = [*tiny_overrides(tmp_path / "a-file" / "runs")]
    result = subprocess.run(
        [*RAYLM, "doctor", "--address", address, *bad], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["stage"] == "doctor" and summary["ok"] is False
    assert "raylm: doctor: storage: writable: cannot write to run.dir" in result.stderr
    good = subprocess.run(
        [*RAYLM, "doctor", "--address", address, *tiny_overrides(tmp_path / "runs")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert good.returncode == 0, good.stderr
    assert {c["status"] for c in json.loads(good.stdout)["checks"]} <= {"ok", "warn"}


def test_submit_waits_for_the_job_and_prints_its_logs(ray_cluster, tmp_path):
    dashboard = "http://" + ray_cluster._private.worker.global_worker.node.address_info["webui_url"]
    command = [*RAYLM, "submit", "prepare", "--address", dashboard, "--python", sys.executable, "--wait"]
    result = subprocess.run(
        [*command, *tiny_overrides(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["stage"] == "submit" and summary["entrypoint"].startswith(f"{sys.executable} jobs/prepare_data.py")
    assert "prepare:" in result.stderr  # the job's own log, printed once it ended
    bad = subprocess.run([*RAYLM, "submit", "serve", "--address", dashboard], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "no job for 'serve'" in bad.stderr


@pytest.mark.parametrize("verb", ["train", "tune"])
def test_a_users_mistake_found_inside_a_worker_or_a_trial_exits_2_with_its_message(prepared, tmp_path, verb):
    import ray

    """A model directory with pickle weights only is refused where the model is built: inside each Train worker (and
    so inside each sweep trial). Ray wraps the error on its way back; raylm still says it in one line, exit 2."""
    cfg, _ = prepared
    address = ray.get_runtime_context().gcs_address
    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "gpt2"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    overrides = [*tiny_overrides(Path(cfg.run.dir)), f"run.name={verb}-mistake", "train.max_failures=0"]
    overrides += [f"model.pretrained={pickled}"]
    if verb == "tune":
        overrides += ['tune.space={"train.lr": {"grid": [1e-3, 3e-3]}}', "tune.scheduler=grid"]
        overrides += ["tune.budget_tokens=512"]
    shutil.copytree(Path(cfg.run.dir) / "t" / "data", Path(cfg.run.dir) / f"{verb}-mistake" / "data")
    result = subprocess.run(
        [*RAYLM, verb, "--address", address, *overrides], cwd=REPO, capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"raylm: {pickled} has no .safetensors weights (pickle weights are not loaded)", last
