"""raylm doctor against the real test cluster: everything ok for a config that fits; a run.dir that cannot be
written, a marker no node can see, and a training run larger than the cluster each fail with the reason."""

from raylm.cluster import plan_resources
from raylm.config import load_config
from raylm.doctor import run_doctor
from raylm.nodes import nodes_missing
from raylm.storage import Location
from tests.conftest import REPO, tiny_overrides


def test_doctor_passes_a_config_that_fits(ray_cluster, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    summary = run_doctor(cfg, plan_resources(cfg, embedded=True), REPO)
    checks = {c["check"]: c for c in summary["checks"]}
    assert summary["ok"], checks
    assert checks["storage: shared"]["reason"] == "every node sees run.dir"
    assert checks["resources"]["status"] == "ok" and "6 CPUs" in checks["resources"]["reason"]
    assert not list(tmp_path.glob(".raylm-shared-*"))  # the marker is removed


def test_doctor_fails_with_the_reason(ray_cluster, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_config(None, [*tiny_overrides(blocker / "runs"), "train.num_workers=8"])
    summary = run_doctor(cfg, plan_resources(cfg, embedded=True), REPO)
    checks = {c["check"]: c for c in summary["checks"]}
    assert not summary["ok"]
    assert (
        checks["storage: writable"]["status"] == "fail"
        and "cannot write to run.dir" in checks["storage: writable"]["reason"]
    )
    assert checks["resources"]["status"] == "fail" and "train.num_workers=8" in checks["resources"]["reason"]


def test_a_node_that_cannot_see_the_marker_is_named(ray_cluster, tmp_path):
    present = Location.parse(tmp_path / "marker")
    present.write_text("x")
    assert nodes_missing(present) == []
    (missing,) = nodes_missing(Location.parse(tmp_path / "absent"))
    assert ray_cluster.util.get_node_ip_address() in missing
