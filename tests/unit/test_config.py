import math
import re
import subprocess
import sys

import pytest

from raylm.config import Config, ConfigError, load_config
from tests.conftest import REPO


def test_defaults_and_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: exp}\ntrain: {lr: 3e-4, num_workers: 2, batch_size: 8}\n")
    cfg = load_config(path, ["train.lr=1e-3", "data.paths=[a.jsonl, 'b*.jsonl']", "data.format=jsonl"])
    assert cfg.run.name == "exp"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.num_workers == 2
    assert cfg.data.paths == ["a.jsonl", "b*.jsonl"]
    assert cfg.train.per_worker_batch() == 4 and cfg.train.micro_batch() == 4 and cfg.train.grad_accum_steps() == 1


def test_string_fields_stay_strings():
    assert load_config(None, ["run.name=123"]).run.name == "123"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lrr=0.1"])
    assert "train.lrr: unknown key (did you mean 'train.lr'?)" in str(err.value)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=fast", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.num_workers=two", "train.num_workers"),
        ("data.seq_len=[1]", "data.seq_len"),
        ("data.format=csv", "data.format"),
    ],
)
def test_wrong_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{key}:" in str(err.value)


def test_global_batch_must_split_over_workers():
    with pytest.raises(ConfigError, match=r"batch_size=10 does not split evenly over train\.num_workers=4"):
        load_config(None, ["train.batch_size=10", "train.num_workers=4"])
    with pytest.raises(
        ConfigError, match=r"share of train.batch_size \(8\) is not a multiple of train.micro_batch_size=3"
    ):
        load_config(None, ["train.batch_size=16", "train.num_workers=2", "train.micro_batch_size=3"])
    cfg = load_config(None, ["train.batch_size=16", "train.num_workers=2", "train.micro_batch_size=2"])
    assert cfg.train.grad_accum_steps() == 4


def test_elastic_worker_range_must_split_the_batch_for_every_count():
    cfg = load_config(None, ["train.num_workers=[1, 2]", "train.batch_size=8", "train.micro_batch_size=2"])
    assert cfg.train.elastic and list(cfg.train.worker_counts) == [1, 2]
    assert cfg.train.grad_accum_steps(1) == 4 and cfg.train.grad_accum_steps(2) == 2
    with pytest.raises(ConfigError, match=r"batch_size=8 does not split evenly over 3 workers \(train.num_workers="):
        load_config(None, ["train.num_workers=[2, 4]", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"with 2 workers each worker's share of train.batch_size \(6\)"):
        load_config(None, ["train.num_workers=[1, 3]", "train.batch_size=12", "train.micro_batch_size=4"])
    for bad in ("[2, 1]", "[0, 2]", "[1, 2, 3]"):
        with pytest.raises(ConfigError, match=r"train\.num_workers: "):
            load_config(None, [f"train.num_workers={bad}"])
    assert load_config(None, ["train.num_workers=[2, 2]"]).train.num_workers == 2


def test_epochs_or_max_steps():
    cfg = load_config(None, ["train.epochs=2.5", "train.batch_size=8"])
    assert cfg.train.total_steps(100) == 32  # ceil(2.5 * 100 / 8)
    assert load_config(None, []).train.total_steps(100) == 100
    assert load_config(None, ["train.max_steps=7"]).train.total_steps(10**6) == 7
    with pytest.raises(ConfigError, match=r"give train\.max_steps or train\.epochs, not both"):
        load_config(None, ["train.epochs=1", "train.max_steps=5"])


def test_precision_and_checkpoints_kept():
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"train\.num_to_keep: Input should be greater than or equal to 2"):
        load_config(None, ["train.num_to_keep=1"])


def test_tune_space_is_checked():
    cfg = load_config(None, ['tune.space={"train.lr": {"loguniform": ["1e-4", 1e-2]}}'])
    assert cfg.tune.space["train.lr"]["loguniform"] == [1e-4, 1e-2]
    for space, message in [
        ('{"train.lrr": {"choice": [1]}}', "'train.lrr' is not a train field (did you mean 'train.lr'?)"),
        ('{"train.lr": {"loguniform": [0, 1]}}', "needs 0 < low < high"),
        ('{"train.lr": {"choice": []}}', "is empty"),
        ('{"train.batch_size": {"choice": [8, 5]}}', "5 is invalid"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"tune.space={space}", "train.num_workers=2", "train.batch_size=8"])
        assert message in str(err.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(path)


def test_files_source_needs_paths():
    with pytest.raises(ConfigError, match=r"data\.paths is empty"):
        load_config(None, ["data.source=files"])


def test_default_config_is_the_offline_demo():
    cfg = Config()
    assert cfg.data.source == "stdlib"
    assert math.isfinite(cfg.train.lr)


def test_cli_exits_2_naming_the_key_before_starting_ray():
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "train", "--config", "jobs/configs/tiny.yaml", "train.lrr=0.1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "train.lrr: unknown key (did you mean 'train.lr'?)" in result.stderr
    assert result.stdout == ""


def test_run_dir_is_made_absolute_where_the_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.dir=runs"])
    assert cfg.run.dir == str(tmp_path / "runs")
    # Re-validated on a worker with another working directory, it stays where the user meant.
    monkeypatch.chdir("/")
    assert Config.model_validate(cfg.model_dump()).run.dir == str(tmp_path / "runs")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"run:\n  name: caf\xe9\n", r"not UTF-8 text \(byte 0xe9 at line 2, column 12\)"),
        (b"run:\n  name: a\x07b\n", r"character U\+0007 at line 2, column 10 is not allowed in YAML"),
    ],
)
def test_a_config_file_that_is_no_text_is_named(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {message}"):
        load_config(path)


def test_a_config_file_that_cannot_be_read_is_named():
    with pytest.raises(ConfigError, match=r"/proc/self/mem: cannot read the config file"):
        load_config("/proc/self/mem")  # a file, whose read fails (as root, a chmod would not stop it)
