"""raylm submit against the test cluster's Jobs API (token authentication on): a stage runs as a job from a copy
of this checkout, and hostile override values reach raylm as data, never as shell."""

import sys

import pytest

from raylm.submit import submit, wait
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def dashboard(ray_cluster) -> str:
    return "http://" + ray_cluster._private.worker.global_worker.node.address_info["webui_url"]


def test_a_submitted_prepare_job_runs_from_the_shipped_checkout(dashboard, tmp_path):
    job = submit(dashboard, "prepare", None, tiny_overrides(tmp_path), REPO, python=sys.executable)
    assert job["upload_mib"] < 10
    ended = wait(dashboard, job["job_id"], timeout_s=300)
    assert ended["status"] == "SUCCEEDED", ended["logs"][-3000:]
    assert (tmp_path / "t" / "data" / "manifest.json").is_file()
    assert "prepare:" in ended["logs"]


def test_hostile_values_stay_data(dashboard, tmp_path):
    owned = [tmp_path / "owned-1", tmp_path / "owned-2"]
    hostile = [f"run.name=x; touch {owned[0]}", f"data.max_bytes=$(touch {owned[1]})"]
    job = submit(dashboard, "prepare", None, [*tiny_overrides(tmp_path), *hostile], REPO, python=sys.executable)
    ended = wait(dashboard, job["job_id"], timeout_s=300)
    assert ended["status"] == "FAILED"
    assert not any(path.exists() for path in owned)
    # raylm received each value whole and refused it by name.
    assert f"(got 'x; touch {owned[0]}')" in ended["logs"]
    assert f"(got '$(touch {owned[1]})')" in ended["logs"]
