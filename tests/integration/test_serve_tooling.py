"""Serve's own tooling runs raylm's application: `serve run serve.app:app key=value ...` and `serve deploy
serve/config.yaml` against a running cluster deploy the same OpenAI-compatible app that `raylm serve` does."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from raylm.config import validate_config
from raylm.serving.server import http_options, stop_serving, wait_until_healthy
from tests.conftest import REPO, register_untrained_model

pytestmark = pytest.mark.timeout(300)


def _registered_with_serve_up(prepared, serve_port: int, name: str):
    """A config whose registry holds model `name`, with Serve's proxy on this session's port (once per cluster)."""
    from ray import serve

    base, data = prepared
    tree = base.model_dump(mode="json")
    tree["serve"] = {"port": serve_port}
    cfg = validate_config(tree)
    register_untrained_model(cfg, data, name)
    serve.start(http_options=http_options(cfg.serve))
    return cfg


def _completion(serve_port: int) -> dict:
    url = f"http://127.0.0.1:{serve_port}"
    wait_until_healthy(url, 180)
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "The", "max_tokens": 3}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_serve_run_deploys_raylms_app_from_the_registry(prepared, serve_port, ray_cluster):
    cfg = _registered_with_serve_up(prepared, serve_port, "viaserve")
    command = [
        str(Path(sys.executable).with_name("serve")),
        "run",
        "--non-blocking",
        "--address",
        ray_cluster.get_runtime_context().gcs_address,
        "--name",
        "raylm",
        "serve.app:app",
        f"run.dir={cfg.run.dir}",
        "model=viaserve:latest",
        "serve.max_batch_size=2",
    ]
    result = subprocess.run(command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    try:
        body = _completion(serve_port)
        assert body["model"] == "viaserve" and body["system_fingerprint"].startswith("raylm-viaserve-v1-")
        models = {m["id"] for m in httpx.get(f"http://127.0.0.1:{serve_port}/v1/models", timeout=30).json()["data"]}
        assert models == {"viaserve", "viaserve:1", "viaserve:latest"}
    finally:
        stop_serving()


def test_serve_deploy_of_the_shipped_config_serves_the_registered_model(prepared, serve_port, ray_cluster, tmp_path):
    """`serve deploy serve/config.yaml` through the dashboard's REST API (with Ray's token authentication on): the
    shipped config with only the port, the model and run.dir changed."""
    import yaml

    cfg = _registered_with_serve_up(prepared, serve_port, "viadeploy")
    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    shipped["http_options"]["port"] = serve_port
    shipped["applications"][0]["args"].update({"model": "viadeploy:latest", "run.dir": cfg.run.dir})
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(shipped))
    dashboard = ray_cluster._private.worker.global_worker.node.address_info["webui_url"]
    command = [str(Path(sys.executable).with_name("serve")), "deploy", "--address", f"http://{dashboard}", str(config)]
    result = subprocess.run(command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    try:
        assert _completion(serve_port)["model"] == "viadeploy"
    finally:
        stop_serving()
