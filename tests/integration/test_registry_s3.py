"""The registry on an S3-compatible object store: a real S3 server (moto in server mode, `python -m moto.server`)
that the test starts on 127.0.0.1, reached over HTTP by pyarrow (the files) and boto3 (the conditional writes), with
run.dir's URI options (endpoint, credentials) carried wherever the registry goes: register, list, promote, and a
Serve replica serving `name:best` from it. Concurrent registrations never share a version; concurrent promotions
never leave the worse model best. (GCS has no server here to test against: README.)"""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

from raylm.conditional import S3Writes
from raylm.registry.aliases import resolve, set_best
from raylm.registry.store import list_models, register, weights_hash
from raylm.storage import Location
from tests.conftest import free_port
from tests.unit.test_registry import make_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def s3_run_dir():
    """run.dir on a bucket of a moto server of this module's own, as a user writes it (options in the URI)."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start"
                time.sleep(0.3)
        # Credentials from the environment (tests/conftest.py), as pyarrow and boto3 both read them.
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(
            Bucket="raylm"
        )
        yield f"s3://raylm/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _registry(s3_run_dir: str, prefix: str) -> Location:
    base, _, options = s3_run_dir.partition("?")
    return Location.parse(f"{base}/{prefix}/registry?{options}")


def test_the_server_honours_both_conditions(s3_run_dir):
    location = _registry(s3_run_dir, "conditions") / "object"
    writes = S3Writes(location)
    assert writes.create(location, b"first") and not writes.create(location, b"second")
    data, tag = writes.read(location)
    assert data == b"first"
    assert writes.replace(location, b"third", tag) and not writes.replace(location, b"fourth", tag)  # stale ETag
    assert writes.read(location)[0] == b"third"


def test_registrations_at_once_never_share_a_version(s3_run_dir, tmp_path):
    registry = _registry(s3_run_dir, "concurrent")
    checkpoints = [make_checkpoint(tmp_path / f"c{seed}", seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda c: register(registry, "lm", c, {})[0], checkpoints))
    assert sorted(v.version for v in versions) == [1, 2, 3, 4] and list_models(registry) == {"lm": [1, 2, 3, 4]}
    for checkpoint, version in zip(checkpoints, versions, strict=True):
        assert weights_hash(version.path) == weights_hash(Location.parse(checkpoint))  # its own files, whole


def test_promotions_at_once_never_leave_the_worse_model_best(s3_run_dir, tmp_path):
    registry = _registry(s3_run_dir, "promotions")
    better, worse = (register(registry, "lm", make_checkpoint(tmp_path / f"c{s}", s), {})[0] for s in (0, 1))
    loss = {better.version: 1.0, worse.version: 2.0, None: float("inf")}
    better_promoted, asked = threading.Event(), []

    def worse_beats(current):
        asked.append(current)
        if len(asked) == 1:
            better_promoted.wait(30)  # it read "no best yet"; meanwhile the better model is promoted
        return loss[worse.version] < loss[current]

    racing = threading.Thread(target=lambda: set_best(registry, "lm", worse.version, "gate", worse_beats))
    racing.start()
    deadline = time.monotonic() + 30
    while not asked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set_best(registry, "lm", better.version, "gate", lambda current: loss[better.version] < loss[current])
    better_promoted.set()
    racing.join(30)
    assert asked == [None, better.version]  # its If-None-Match failed: it read the new best and stood down
    assert resolve(registry, "lm:best").version == better.version


def test_register_list_promote_and_serve_best_from_s3(s3_run_dir, tmp_path, ray_cluster, serve_port):
    from raylm.cli import app
    from raylm.cluster import plan_resources
    from raylm.config import load_config
    from raylm.serving.server import start_serving, stop_serving

    base, _, options = s3_run_dir.partition("?")
    overrides = [f"run.dir={base}/cli?{options}", "run.name=s3run", "registry.name=lm"]
    cli = CliRunner()
    first = cli.invoke(app, ["register", "--checkpoint", str(make_checkpoint(tmp_path / "c0", 0)), *overrides])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["version"] == 1 and summary["path"].startswith("s3://raylm/runs/cli/registry/lm/1")
    assert "endpoint_override" not in first.stdout  # a URI's options are never printed (they may hold secrets)
    cli.invoke(app, ["register", "--checkpoint", str(make_checkpoint(tmp_path / "c1", 1)), *overrides])
    listed = cli.invoke(app, ["models", "list", *overrides])
    assert json.loads(listed.stdout)["models"]["lm"]["versions"] == [1, 2], listed.output
    promoted = cli.invoke(app, ["models", "promote", "lm:1", *overrides])
    assert promoted.exit_code == 0, promoted.output
    shown = cli.invoke(app, ["models", "show", "lm:best", *overrides])
    assert json.loads(shown.stdout)["model"] == "lm:1"

    # A replica told to serve lm:best from this endpoint copies the version from it (not from AWS).
    cfg = load_config(None, [*overrides, "serve.model=lm:best", f"serve.port={serve_port}"])
    served = start_serving(cfg, plan_resources(cfg, embedded=True))
    try:
        assert served["version"] == 1
        body = {"model": "lm:best", "prompt": "hello", "max_tokens": 3}
        reply = httpx.post(f"{served['url']}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["system_fingerprint"].startswith("raylm-lm-v1-"), reply.text
    finally:
        stop_serving()
