"""raylm doctor's checks that need no cluster: versions, the size of a job upload. (The auth check asks the
cluster: tests/multinode/test_ray_start.py.)"""

import pytest

from raylm.doctor import upload, upload_size, versions


def test_versions_are_checked_against_raylms_own_requirements():
    found = {f.check: f for f in versions()}
    assert set(found) == {"version: ray", "version: torch", "version: transformers"}
    assert found["version: ray"].status == "ok" and found["version: ray"].reason.startswith("2.60")


def test_upload_counts_what_a_job_would_ship(tmp_path, monkeypatch):
    (tmp_path / ".gitignore").write_text("ignored.bin\n")
    (tmp_path / ".rayignore").write_text("/.venv/\n/runs/\n/data/\n")
    (tmp_path / "code.py").write_bytes(b"x" * 1000)
    (tmp_path / "ignored.bin").write_bytes(b"x" * 50_000)  # .gitignore'd: Ray leaves it out too
    for excluded in (".venv", "runs", "data"):
        (tmp_path / excluded).mkdir()
        (tmp_path / excluded / "big.bin").write_bytes(b"x" * 100_000)
    (tmp_path / "pkg" / "data").mkdir(parents=True)  # anchored patterns: a package named data is code
    (tmp_path / "pkg" / "data" / "module.py").write_bytes(b"x" * 300)
    ignore_files = len("ignored.bin\n") + len("/.venv/\n/runs/\n/data/\n")
    assert upload_size(tmp_path) == 1000 + 300 + ignore_files
    assert upload(tmp_path).status == "ok"
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # Ray's switch: then .gitignore'd files travel
    assert upload_size(tmp_path) == 1000 + 300 + ignore_files + 50_000

    import ray._private.runtime_env.packaging as packaging

    monkeypatch.setattr(packaging, "GCS_STORAGE_MAX_SIZE", 1000)
    finding = upload(tmp_path)
    assert finding.status == "fail" and "exclude large files" in finding.reason


@pytest.mark.parametrize("size, status", [(600, "warn"), (100, "ok")])
def test_upload_warns_past_half_the_limit(tmp_path, monkeypatch, size, status):
    (tmp_path / "a.bin").write_bytes(b"x" * size)  # not a git checkout: every file counts
    import ray._private.runtime_env.packaging as packaging

    monkeypatch.setattr(packaging, "GCS_STORAGE_MAX_SIZE", 1000)
    assert upload(tmp_path).status == status
