"""raylm submit without a cluster: the job's command is an argv quoted for the shell, and the upload is what it
should be."""

import shlex
import shutil

import pytest

from raylm.submit import SubmitError, check_upload, entrypoint, runtime_env
from tests.conftest import REPO

HOSTILE = ["run.name=x; touch /tmp/owned", "data.max_bytes=$(touch /tmp/owned)", "train.lr=`id`", "a=b'c\"d"]


def test_hostile_values_stay_one_argument_each():
    command = entrypoint("train", "jobs/configs/tiny.yaml", HOSTILE)
    assert shlex.split(command) == ["python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml", *HOSTILE]
    assert "; touch" not in command.replace("'run.name=x; touch /tmp/owned'", "")


def test_unknown_stage_is_refused_by_name():
    with pytest.raises(SubmitError, match=r"no job for 'serve'; stages: prepare, train, tune, pipeline"):
        entrypoint("serve", None, [])


def test_what_travels_with_a_job(tmp_path):
    """The checkout's .rayignore, applied by Ray's own upload walk to a tree holding every kind of file."""
    from raylm.doctor import upload_files

    shutil.copy(REPO / ".rayignore", tmp_path / ".rayignore")
    travels = ["platform/raylm/data/prepare.py", "jobs/train.py"]  # code named data is code
    stays = ["data/corpus.txt", "runs/t/stage.json", ".venv/bin/python", ".git/HEAD", "x/__pycache__/y.pyc"]
    for name in travels + stays:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    shipped = {path.relative_to(tmp_path).as_posix() for path in upload_files(tmp_path)}
    assert shipped == {*travels, ".rayignore"}
    assert runtime_env(REPO) == {"working_dir": str(REPO)}
    with pytest.raises(SubmitError, match=r"\.rayignore is missing"):
        runtime_env(tmp_path.parent / "elsewhere")


def test_an_upload_over_rays_limit_is_refused_before_submitting(tmp_path, monkeypatch):
    import ray._private.runtime_env.packaging as packaging

    (tmp_path / "weights.bin").write_bytes(b"x" * 5000)
    monkeypatch.setattr(packaging, "GCS_STORAGE_MAX_SIZE", 4096)
    with pytest.raises(SubmitError, match="too large to ship"):
        check_upload(tmp_path)


def test_a_job_that_shipped_raylm_hands_the_same_package_to_its_workers(monkeypatch, tmp_path):
    from raylm.cluster import shipped_package_runtime_env

    shipped = tmp_path / "platform" / "raylm"
    shipped.mkdir(parents=True)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert shipped_package_runtime_env(shipped, tmp_path) is None  # not a job: the cluster is the user's own
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert shipped_package_runtime_env(shipped, tmp_path) == {"py_modules": [str(shipped.resolve())]}
    # A job whose raylm is installed on the node (not in the shipped working dir) needs nothing shipped.
    assert shipped_package_runtime_env(shipped, tmp_path / "elsewhere") is None


@pytest.fixture
def cli(monkeypatch):
    import signal

    from typer.testing import CliRunner

    monkeypatch.chdir(REPO)  # raylm submit ships the checkout it runs in
    handler = signal.getsignal(signal.SIGTERM)
    yield CliRunner()
    signal.signal(signal.SIGTERM, handler)


def _nowhere() -> str:
    from tests.conftest import free_port

    return f"http://127.0.0.1:{free_port()}"  # no Jobs API listens there


def test_a_bad_override_is_refused_before_anything_is_sent(cli):
    from raylm.cli import app

    result = cli.invoke(app, ["submit", "train", "--address", _nowhere(), "train.lr=-1"])
    assert result.exit_code == 2 and "train.lr" in result.stderr, result.output  # not the unreachable cluster's 1
    result = cli.invoke(app, ["submit", "train", "-c", "jobs/configs/nope.yaml", "--address", _nowhere()])
    assert result.exit_code == 2 and "config file not found" in result.stderr, result.output


@pytest.mark.parametrize(
    "override",
    [
        "data.paths=['s3://bucket/corpus.jsonl?secret_key=wJalrSECRET']",
        "train.mlflow_tracking_uri=https://user:hunter2SECRET@mlflow.example",
        "data.paths=['https://ghp_SECRETtoken@raw.example/corpus.txt']",
    ],
)
def test_credentials_in_overrides_are_refused_and_never_echoed(cli, override):
    from raylm.cli import app

    result = cli.invoke(app, ["submit", "prepare", "--address", _nowhere(), override])
    assert result.exit_code == 2 and "carries a credential" in result.stderr, result.output
    assert "SECRET" not in result.output


def test_an_unreachable_jobs_api_is_one_line(cli):
    from raylm.cli import app

    address = _nowhere()
    result = cli.invoke(app, ["submit", "prepare", "--address", address])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"raylm: raylm submit: the Jobs API at {address} did not take the request")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
