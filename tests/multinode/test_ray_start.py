"""A cluster started the way a user starts one: `ray get-auth-token --generate`, then
`RAY_AUTH_MODE=token ray start --head --block` as a subprocess with a temp dir, ports and HOME of its own (its token
lands in that HOME's ~/.ray/auth_token). raylm and `ray job submit` reach it with `--address` and nothing exported:
no RAY_* variable reaches them. The head is stopped by ending every process of its session, never `ray stop` (which
stops every Ray on the machine). In tests/multinode: one Ray cluster per pytest session."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port, tiny_overrides

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent
API_KEY = "sk-" + os.urandom(16).hex()  # made here: this file itself is shipped with the job


@dataclass
class Head:
    process: subprocess.Popen
    address: str  # the GCS, for `--address`
    dashboard: str  # the Jobs API
    token: str
    home: Path
    runs: Path
    log: object = None

    def env(self, **extra: str) -> dict[str, str]:
        """What a user's shell has: their HOME and the virtual environment on PATH; no RAY_* variable."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "RAYLM_API_KEY"}
        return {**env, "HOME": str(self.home), "PATH": f"{BIN}:{env['PATH']}", **extra}

    def run(self, *argv: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(argv), cwd=REPO, env=self.env(**extra_env), capture_output=True, text=True, timeout=timeout
        )


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _end_session(sid: int) -> list[psutil.Process]:
    """SIGTERM every process of the session, SIGKILL what is left after 15 s; returns what survived."""
    processes = _session_processes(sid)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    return [p for p in _session_processes(sid) if p.is_running()]


def _start_head(temp: Path, home: Path, token: str, **env: str) -> Head:
    """`ray start --head --block` with its own temp dir, ports and HOME, in a session of its own."""
    port, dashboard_port = free_port(), free_port()
    shell = Head(None, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", token, home, temp / "runs")
    ports = {
        "--port": port,
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
    }
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=6", f"--temp-dir={temp / 'ray'}"]
    command += [f"{flag}={value}" for flag, value in ports.items()] + ["--disable-usage-stats"]
    log = open(temp / "head.log", "w")  # noqa: SIM115 (open for the head's whole life)
    shell.process = subprocess.Popen(
        command, cwd=REPO, env=shell.env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    shell.log = log
    return shell


@pytest.fixture(scope="module")
def head():
    import ray

    if ray.is_initialized():
        pytest.skip("needs a pytest session of its own: pytest tests/multinode")
    temp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths live under it
    home = temp / "home"
    home.mkdir()
    (temp / "runs").mkdir()
    shell = Head(None, "", "", "", home, temp / "runs")
    generated = shell.run(str(BIN / "ray"), "get-auth-token", "--generate", timeout=60)
    assert generated.returncode == 0, generated.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token and generated.stdout.strip() == token
    shell = _start_head(temp, home, token, RAY_AUTH_MODE="token")
    try:
        _wait_for_jobs_api(shell)
        yield shell
    finally:
        survivors = _end_session(shell.process.pid)
        shell.log.close()
        assert survivors == [], f"processes of the head's session still running: {survivors}"


def _wait_for_jobs_api(head: Head) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.process.poll() is None, (head.home.parent / "head.log").read_text()[-3000:]
        try:
            if httpx.get(f"{head.dashboard}/api/jobs/", headers=_bearer(head.token), timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the head's Jobs API did not come up in 120 s")


def _open_beyond_loopback(port: int) -> list[str]:
    """This machine's other addresses on which `port` accepts a connection."""
    import socket

    addresses = [a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET]
    reachable = []
    for address in addresses:
        if address.startswith("127."):
            continue
        with socket.socket() as sock:
            sock.settimeout(2)
            if sock.connect_ex((address, port)) == 0:
                reachable.append(address)
    return reachable


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _summary(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_jobs_api_refuses_a_request_without_the_right_token(head):
    assert httpx.get(f"{head.dashboard}/api/jobs/", timeout=10).status_code == 401
    wrong = httpx.get(f"{head.dashboard}/api/jobs/", headers=_bearer("0" * len(head.token)), timeout=10)
    assert wrong.status_code in {401, 403} and head.token not in wrong.text
    submitted = httpx.post(f"{head.dashboard}/api/jobs/", json={"entrypoint": "touch /tmp/raylm-owned"}, timeout=10)
    assert submitted.status_code == 401 and not Path("/tmp/raylm-owned").exists()
    assert httpx.get(f"{head.dashboard}/api/jobs/", headers=_bearer(head.token), timeout=10).status_code == 200
    # Bound to loopback: nothing answers on the machine's other addresses.
    assert _open_beyond_loopback(int(head.dashboard.rsplit(":", 1)[1])) == []


def test_raylm_finds_the_token_wherever_ray_keeps_it_or_says_it_is_missing(head, tmp_path):
    elsewhere = tmp_path / "another-home"  # no ~/.ray/auth_token here
    elsewhere.mkdir()
    (tmp_path / "token").write_text(head.token)
    doctor = [str(BIN / "raylm"), "doctor", "--address", head.address, *tiny_overrides(head.runs, name="doc")]
    assert head.run(*doctor, HOME=str(elsewhere), RAY_AUTH_TOKEN=head.token).returncode == 0
    assert head.run(*doctor, HOME=str(elsewhere), RAY_AUTH_TOKEN_PATH=str(tmp_path / "token")).returncode == 0
    missing = head.run(*doctor, HOME=str(elsewhere))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "token" in missing.stderr and head.token not in missing.stderr + missing.stdout
    # The Jobs API's 401 to `raylm submit` without the token: one line saying so, exit 1, nothing uploaded.
    submit = [str(BIN / "raylm"), "submit", "prepare", "--address", head.dashboard, *tiny_overrides(head.runs, "x")]
    refused = head.run(*submit, HOME=str(elsewhere))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raylm: raylm submit: the Jobs API at {head.dashboard} did not take the request")
    assert "token" in last and head.token not in refused.stderr + refused.stdout


def test_doctor_reports_the_clusters_auth_mode_not_its_own(head, tmp_path):
    """raylm turns token mode on in its own environment, which says nothing of the cluster's: doctor asks the
    cluster's Jobs API. A head started without token auth is reported as such, to a raylm that has a token."""
    doctor = [str(BIN / "raylm"), "doctor", *tiny_overrides(tmp_path / "runs", name="doc")]
    checks = {c["check"]: c for c in _summary(head.run(*doctor, "--address", head.address))["checks"]}
    assert checks["auth"]["status"] == "ok" and "token authentication is on" in checks["auth"]["reason"]

    temp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths live under it
    (temp / "runs").mkdir()
    (temp / "home").mkdir()  # no token there: the head starts without one
    open_head = _start_head(temp, temp / "home", "", RAY_AUTH_MODE="disabled")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{open_head.dashboard}/api/jobs/", timeout=5).status_code == 200:  # no token needed
                    break
            time.sleep(1)
        result = head.run(*doctor, "--address", open_head.address)  # the user's HOME: a token is at hand
        checks = {c["check"]: c for c in json.loads(result.stdout.strip().splitlines()[-1])["checks"]}
        assert checks["auth"]["status"] == "warn", checks["auth"]
        assert "token authentication is off on this cluster" in checks["auth"]["reason"]
    finally:
        _end_session(open_head.process.pid)
        open_head.log.close()


def test_raylm_prepares_trains_and_tunes_on_the_head_with_nothing_exported(head):
    overrides = tiny_overrides(head.runs, name="cli")
    prepared = _summary(head.run(str(BIN / "raylm"), "prepare", "--address", head.address, *overrides))
    assert prepared["train_blocks"] > 0
    trained = _summary(head.run(str(BIN / "raylm"), "train", "--address", head.address, *overrides))
    assert trained["step"] == 12
    assert (Path(trained["checkpoint"]) / "model.safetensors").is_file()
    assert str(head.runs) in trained["checkpoint"]

    sweep = [
        *overrides,
        'tune.space={"train.lr": {"grid": [3e-3, 1e-5]}}',
        "tune.scheduler=grid",
        "tune.budget_tokens=1536",  # 6 steps at batch 8 x seq_len 32
        "tune.num_samples=1",
    ]
    tuned = _summary(head.run(str(BIN / "raylm"), "tune", "--address", head.address, *sweep, timeout=500))
    assert tuned["best_config"] == {"train.lr": 3e-3} and len(tuned["trials"]) == 2


@pytest.fixture(scope="module")
def serve_port() -> int:
    """Serve's HTTP proxy keeps the port it started with for the cluster's life."""
    return free_port()


def test_raylm_serve_on_the_head_with_an_api_key(head, serve_port):
    overrides = tiny_overrides(head.runs, name="cli")
    registered = _summary(head.run(str(BIN / "raylm"), "register", *overrides))
    port = serve_port
    process = subprocess.Popen(
        [str(BIN / "raylm"), "serve", "--address", head.address, *overrides, f"serve.port={port}"],
        cwd=REPO, env=head.env(RAYLM_API_KEY=API_KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        summary = json.loads(process.stdout.readline())
        assert summary["url"] == f"http://127.0.0.1:{port}" and summary["version"] == registered["version"]
        body = {"prompt": "The river", "max_tokens": 3}
        url = f"{summary['url']}/v1/completions"
        assert httpx.post(url, json=body, headers=_bearer(API_KEY), timeout=60).status_code == 200
        assert _open_beyond_loopback(port) == []  # serve.host defaults to 127.0.0.1
        refused = httpx.post(url, json=body, headers=_bearer("wrong"), timeout=60)
        assert refused.status_code == 401 and API_KEY not in refused.text and head.token not in refused.text
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        # Ctrl-C deletes raylm's application; Serve's proxy (and any other application) stays on the user's cluster.
        assert httpx.get(f"{summary['url']}/healthz", timeout=10).status_code == 404
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_serve_deploy_of_the_shipped_config_on_the_head(head, serve_port, tmp_path):
    """The shipped serve/config.yaml with only the port, the model and run.dir changed; the app is built on the
    cluster (whose processes started in this checkout, as cluster.yaml starts them in ~/raylm)."""
    import yaml

    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    shipped["http_options"]["port"] = serve_port
    shipped["applications"][0]["args"].update({"model": "cli:latest", "run.dir": str(head.runs)})
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(shipped))
    deployed = head.run(str(BIN / "serve"), "deploy", "--address", head.dashboard, str(config), RAY_AUTH_MODE="token")
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    deadline, reply = time.monotonic() + 120, None
    while time.monotonic() < deadline and (reply is None or reply.status_code != 200):
        time.sleep(1)
        body = {"model": "cli:latest", "prompt": "The river", "max_tokens": 3}
        reply = httpx.post(f"http://127.0.0.1:{serve_port}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["system_fingerprint"].startswith("raylm-cli-v1-"), reply.text
    shutdown = head.run(str(BIN / "serve"), "shutdown", "--address", head.dashboard, "-y", RAY_AUTH_MODE="token")
    assert shutdown.returncode == 0, shutdown.stderr[-3000:]


def _app_status(head: Head, timeout: float = 180) -> dict:
    """raylm's application as `serve status` reports it, once it is RUNNING or DEPLOY_FAILED."""
    import yaml

    deadline = time.monotonic() + timeout
    while True:
        status = head.run(str(BIN / "serve"), "status", "--address", head.dashboard, RAY_AUTH_MODE="token")
        assert status.returncode == 0, status.stderr[-3000:]
        app = (yaml.safe_load(status.stdout).get("applications") or {}).get("raylm") or {}
        if app.get("status") in ("RUNNING", "DEPLOY_FAILED") or time.monotonic() > deadline:
            return app
        time.sleep(2)


def _deploy(head: Head, tmp_path: Path, port: int, name: str, args: dict, env_vars: dict | None = None, **env: str):
    """`serve deploy` of the shipped config with Serve's proxy on every interface (http_options.host 0.0.0.0)."""
    import yaml

    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    shipped["http_options"].update({"host": "0.0.0.0", "port": port})
    shipped["applications"][0]["args"].update({"model": "cli:latest", "run.dir": str(head.runs), **args})
    if env_vars:
        shipped["applications"][0]["runtime_env"] = {"env_vars": env_vars}
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(shipped))
    deployed = head.run(str(BIN / "serve"), "deploy", "--address", head.dashboard, str(config), **env)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    return _app_status(head)


def test_a_public_bind_needs_a_key_on_every_serving_path(head, tmp_path):
    """The replica checks the host Serve's proxy really binds (http_options.host, which the app's builder never
    sees), with the key of the cluster's environment or serve.api_key_file: under `serve deploy` a key exported in the
    deploying shell does not reach the cluster, and the app fails with the reason instead of serving without a key."""
    port = free_port()
    key_file = tmp_path / "api_key"
    key_file.write_text(API_KEY + "\n")
    try:
        refused = _deploy(head, tmp_path, port, "nokey", {}, RAY_AUTH_MODE="token", RAYLM_API_KEY=API_KEY)
        assert refused.get("status") == "DEPLOY_FAILED", refused
        assert "http_options.host=0.0.0.0 would expose the model" in json.dumps(refused), refused

        served = _deploy(head, tmp_path, port, "keyfile", {"serve.api_key_file": str(key_file)}, RAY_AUTH_MODE="token")
        assert served.get("status") == "RUNNING", served
        url, body = f"http://127.0.0.1:{port}/v1/completions", {"prompt": "The river", "max_tokens": 2}
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        assert httpx.post(url, json=body, headers=_bearer(API_KEY), timeout=60).status_code == 200

        # A key in the config's runtime_env works, and the replica warns that the dashboard shows it.
        visible = "sk-visible-" + os.urandom(8).hex()
        shown = _deploy(head, tmp_path, port, "envvars", {}, {"RAYLM_API_KEY": visible}, RAY_AUTH_MODE="token")
        assert shown.get("status") == "RUNNING", shown
        assert httpx.post(url, json=body, headers=_bearer(visible), timeout=60).status_code == 200
        logs = head.home.parent / "ray"
        warned = [p for p in logs.rglob("replica_raylm_*.log") if b"Ray's dashboard shows" in p.read_bytes()]
        assert warned, "no replica log warns about the key in runtime_env env_vars"

        # `serve run` builds the app here: a key exported in its shell reaches the replica (only its hash does).
        run = [str(BIN / "serve"), "run", "--non-blocking", "--address", head.address, "--name", "raylm"]
        app = ["serve.app:app", f"run.dir={head.runs}", "model=cli:latest"]
        with_key = head.run(*run, *app, RAY_AUTH_MODE="token", RAYLM_API_KEY=API_KEY)
        assert with_key.returncode == 0, with_key.stderr[-3000:]
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        assert httpx.post(url, json=body, headers=_bearer(API_KEY), timeout=60).status_code == 200
        without = head.run(*run, *app, RAY_AUTH_MODE="token")  # Serve's `serve run` says it failed, yet exits 0
        assert "Deploying application raylm failed" in without.stdout + without.stderr, without.stderr[-3000:]
        with contextlib.suppress(httpx.ConnectError):  # Serve's failed `serve run` may take the proxy down too
            assert httpx.post(url, json=body, headers=_bearer(API_KEY), timeout=60).status_code == 404
    finally:
        shutdown = head.run(str(BIN / "serve"), "shutdown", "--address", head.dashboard, "-y", RAY_AUTH_MODE="token")
        assert shutdown.returncode == 0, shutdown.stderr[-3000:]


def test_ray_job_submit_runs_jobs_train_py_from_the_shipped_checkout(head):
    overrides = tiny_overrides(head.runs, name="job")
    _summary(head.run(str(BIN / "raylm"), "prepare", "--address", head.address, *overrides))
    submitted = head.run(
        str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
        "python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml", *overrides,
        timeout=500, RAY_AUTH_MODE="token",  # Ray's own CLI sends the token only when told to (README)
    )  # fmt: skip
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    assert "succeeded" in submitted.stdout + submitted.stderr
    checkpoints = sorted((head.runs / "job").rglob("model.safetensors"))
    assert checkpoints, "no checkpoint in the storage path"

    logs = head.run(str(BIN / "ray"), "job", "logs", job_id, "--address", head.dashboard, RAY_AUTH_MODE="token")
    assert logs.returncode == 0, logs.stderr
    assert re.search(r"train .*12/12", logs.stdout), logs.stdout[-3000:]  # the progress bar, as the job saw it
    summary = json.loads([line for line in logs.stdout.splitlines() if line.startswith('{"stage": "train"')][-1])
    assert summary["step"] == 12


# Single quotes only: `ray job submit` quotes its entrypoint with list2cmdline, for a shell.
WORKER_PROBE = """
import sys
sys.path.insert(0, 'platform')  # what jobs/*.py do: the driver imports the shipped copy
import ray, raylm
from raylm.cluster import ray_session
from raylm.config import load_config

with ray_session(load_config(None, [])):
    where = ray.get(ray.remote(num_cpus=0)(lambda: __import__('raylm').__file__).remote())
    variable = 'RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S'
    expiry = ray.get(ray.remote(num_cpus=0)(lambda: __import__('os').environ.get(variable)).remote())
print('driver raylm:', raylm.__file__)
print('worker raylm:', where)
print('worker data request expiry:', expiry)
"""


def test_a_jobs_workers_import_the_shipped_raylm_not_an_installed_one(head):
    """Nodes need not have raylm installed: a job's workers get the driver's shipped copy (py_modules), even here,
    where an installed one (this checkout, editable) would otherwise answer."""
    probed = head.run(
        str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
        "python", "-c", WORKER_PROBE, timeout=300, RAY_AUTH_MODE="token",
    )  # fmt: skip
    output = probed.stdout + probed.stderr
    assert probed.returncode == 0, output[-4000:]
    driver = re.search(r"driver raylm: (\S+)", output).group(1)
    worker = re.search(r"worker raylm: (\S+)", output).group(1)
    assert "runtime_resources" in driver and "runtime_resources" in worker, (driver, worker)
    assert not worker.startswith(str(REPO)), worker
    # raylm's worker variables reach a job's workers on a cluster raylm did not start (its runtime env).
    assert re.search(r"worker data request expiry: (\S+)", output).group(1) == "30", output[-2000:]


def test_no_token_or_api_key_in_logs_or_manifests(head):
    """Runs after the others (pytest keeps file order): every file the head's session and the runs wrote."""
    secrets = {"Ray token": head.token, "API key": API_KEY}
    written = [p for root in (head.home.parent / "ray", head.runs) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 50
    leaks = []
    for path in written:
        if path.is_symlink() or path.suffix in {".safetensors", ".parquet", ".arrow"}:
            continue
        data = path.read_bytes()
        leaks += [(what, str(path)) for what, secret in secrets.items() if secret.encode() in data]
    assert leaks == []
