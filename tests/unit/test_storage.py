"""Location: the same path operations on the local filesystem and on another pyarrow filesystem."""

import pyarrow.fs as pafs
import pytest

from raylm.storage import Location


@pytest.fixture(params=["local", "mock"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(tmp_path / "root")
    return Location(pafs._MockFileSystem(), "bucket/root")  # an in-memory stand-in for s3 and friends


def test_write_read_glob_move_and_remove(root):
    (root / "data" / "train" / "part-00000.parquet").write_bytes(b"x" * 10)
    (root / "data" / "manifest.json").write_text("{}")
    (root / "train" / "checkpoint_1" / "model.safetensors").write_bytes(b"w")
    assert (root / "data" / "manifest.json").read_text() == "{}"
    assert (root / "data" / "train" / "part-00000.parquet").size() == 10
    assert [loc.name for loc in (root / "data").glob("*.json")] == ["manifest.json"]
    assert [loc.name for loc in root.glob("train/checkpoint_*")] == ["checkpoint_1"]
    assert [loc.name for loc in (root / "data").iterdir()] == ["manifest.json", "train"]
    assert not [loc for loc in (root / "data").iterdir() if loc.name.endswith(".tmp")], "atomic writes leave no temp"
    (root / "train" / "checkpoint_1").move(root / "train" / "checkpoint_2")
    assert (root / "train" / "checkpoint_2" / "model.safetensors").is_file()
    (root / "data").rmtree()
    assert not (root / "data").exists() and (root / "train").is_dir()
    assert (root / "train" / "checkpoint_2").is_relative_to(root)
    assert not root.is_relative_to(root / "train")


def test_upload_and_download_directories(root, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "tokenizer.json").write_text("{}")
    (local / "config.json").write_text('{"a": 1}')
    (root / "tok").upload(local)
    assert sorted(loc.name for loc in (root / "tok").iterdir()) == ["config.json", "tokenizer.json"]
    copy = (root / "tok").download(tmp_path / "copy")
    assert (copy / "config.json").read_text() == '{"a": 1}'


def test_uris_and_local_paths_parse():
    assert str(Location.parse("/tmp/x/../y")) == "/tmp/x/../y"
    assert Location.parse("file:///tmp/y").is_local and Location.parse("file:///tmp/y").path == "/tmp/y"
    assert str(Location(pafs._MockFileSystem(), "bucket/a")) == "mock://bucket/a"
    with pytest.raises(ValueError, match="not on the local filesystem"):
        _ = Location(pafs._MockFileSystem(), "bucket/a").local


def test_a_uris_options_travel_with_it_and_are_never_shown():
    """`run.dir=s3://...?endpoint_override=...`: what crosses into another process as text (`uri`) keeps the options,
    so that it names the same store there; what is shown (`str`) leaves them out."""
    options = "endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    runs = Location.parse(f"s3://bucket/runs?{options}")
    registry = runs / "registry"
    assert registry.uri == f"s3://bucket/runs/registry?{options}" and str(registry) == "s3://bucket/runs/registry"
    assert Location.parse(registry.uri) == registry and registry.parent == runs
    assert [child.uri for child in [registry / "lm"]] == [f"s3://bucket/runs/registry/lm?{options}"]
    # A path a result file recorded without its options gets them back from the run.dir it lies under.
    recorded = runs.within("s3://bucket/runs/train/checkpoint_1")
    assert recorded.uri == f"s3://bucket/runs/train/checkpoint_1?{options}" and recorded.fs is runs.fs
    assert runs.within("/local/checkpoint").is_local
