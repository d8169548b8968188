from pathlib import Path

import pytest
import yaml

from raylm.cluster import SERVE_ENV
from raylm.config import load_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "small.yaml", "sweep.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    load_config(path)


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "serve.app:build_app"
    load_config(REPO / application.args["config"])


def test_cluster_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "cluster.yaml").read_text()
    cluster = prepare_config(yaml.safe_load(text))
    validate_config(cluster)
    # Token auth on every node, with one token: the laptop's, mounted on each.
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [command for command in starts if "ray start" in command]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in ray_starts)
    # Serve's settings, as raylm's own clusters run (cluster.SERVE_ENV), on every node.
    assert all(f"{name}={value}" in command for name, value in SERVE_ENV.items() for command in ray_starts)
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The dashboard and Jobs API stay on the head's loopback; nothing binds every interface.
    assert "--dashboard-host=127.0.0.1" in cluster["head_start_ray_commands"][-1] and "0.0.0.0" not in text
    # Every node installs raylm from the shipped checkout, without uploading the laptop's venv, runs or data.
    assert cluster["file_mounts"]["~/raylm"] == "." and any("make install" in c for c in cluster["setup_commands"])
    assert {".git", ".venv", "runs", "data"} <= set(cluster["rsync_exclude"])


def test_rayignore_keeps_ray_job_submit_uploads_to_code():
    """`ray job submit --working-dir .` (and `raylm submit`) ship this checkout through .gitignore and .rayignore:
    Ray's own walk of it leaves out history, the environment and the outputs, and keeps raylm's code whole."""
    from raylm.doctor import upload_files

    shipped = {path.relative_to(REPO) for path in upload_files(REPO)}
    assert not [path for path in shipped if path.parts[0] in {".git", ".venv", "runs", "data"}]
    assert not [path for path in shipped if "__pycache__" in path.parts]
    assert Path("platform/raylm/data/pack.py") in shipped and Path("jobs/train.py") in shipped
