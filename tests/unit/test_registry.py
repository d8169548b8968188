import json
import math
import signal

import pytest
import torch
from typer.testing import CliRunner

from raylm.config import ModelSection, load_config
from raylm.data.tokenizer import train_bpe
from raylm.digests import tokenizer_hash
from raylm.models import build_model, load_pretrained
from raylm.registry.aliases import aliases_of, describe_models, promote, resolve, set_best, version_aliases
from raylm.registry.register import run_register
from raylm.registry.store import RegistryError, list_models, register
from raylm.runs import RunPaths, claim_stage
from raylm.storage import Location, write_json
from raylm.train.checkpoint import CHECKPOINT_MANIFEST, checkpoint_problem, save_checkpoint


def make_checkpoint(directory, seed: int):
    torch.manual_seed(seed)
    tokenizer = train_bpe(["hello world", "hello there"] * 20, vocab_size=300)
    tokenizer_dir = directory.parent / f"tok-{seed}"
    tokenizer.save_pretrained(str(tokenizer_dir))
    model = build_model(ModelSection(), len(tokenizer), 16, tokenizer.eos_token_id, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(
        directory, model, tokenizer_dir, optimizer, scheduler, {"step": 3, "tokens_seen": 48}, {"val_loss": 5.0}
    )
    return directory


def test_register_versions_resolve_and_reuse(tmp_path):
    registry = tmp_path / "registry"
    first = make_checkpoint(tmp_path / "ckpt1", seed=0)
    second = make_checkpoint(tmp_path / "ckpt2", seed=1)

    v1, new1 = register(registry, "lm", first, {"metrics": {"val_loss": 5.0}, "trial_id": "t1"})
    again, new_again = register(registry, "lm", first, {"metrics": {"val_loss": 5.0}})
    v2, new2 = register(registry, "lm", second, {"metrics": {"val_loss": 4.0}})

    assert (v1.version, new1) == (1, True)
    assert (again.version, new_again) == (1, False)
    assert (v2.version, new2) == (2, True)
    assert resolve(registry, "lm").version == 2
    assert resolve(registry, "lm:latest").version == 2
    assert resolve(registry, "lm:1").manifest["trial_id"] == "t1"
    assert list_models(registry) == {"lm": [1, 2]}
    # A registered version is a plain HF model directory, without optimizer state.
    assert not (v1.path / "train_state.pt").exists()
    from transformers import AutoTokenizer

    assert load_pretrained(str(v1.path)).config.vocab_size == len(AutoTokenizer.from_pretrained(str(v1.path)))
    manifest = json.loads((v2.path / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["metrics"] == {"val_loss": 4.0}


def test_unknown_names_and_versions_are_explained(tmp_path):
    registry = tmp_path / "registry"
    register(registry, "lm", make_checkpoint(tmp_path / "c", seed=0), {})
    with pytest.raises(RegistryError, match=r"no model named 'other'.*registered: lm"):
        resolve(registry, "other")
    with pytest.raises(RegistryError, match=r"'lm:7': lm has versions \[1\] \(and the aliases 'latest', 'best'\)"):
        resolve(registry, "lm:7")


def test_incomplete_checkpoints_are_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "c", seed=0)
    (checkpoint / CHECKPOINT_MANIFEST).unlink()
    assert "missing" in checkpoint_problem(checkpoint)
    with pytest.raises(RegistryError, match="incomplete or corrupt checkpoint"):
        register(tmp_path / "registry", "lm", checkpoint, {})

    truncated = make_checkpoint(tmp_path / "t", seed=0)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "bytes, the manifest says" in checkpoint_problem(truncated)
    assert not (tmp_path / "registry" / "lm").exists() or list_models(tmp_path / "registry") == {}


def test_a_registry_on_another_filesystem(tmp_path):
    import pyarrow.fs as pafs

    from raylm.storage import Location

    registry = Location(pafs._MockFileSystem(), "bucket/registry")
    version, new = register(registry, "lm", make_checkpoint(tmp_path / "c", seed=0), {"metrics": {"val_loss": 1.0}})
    assert new and str(version.path) == "mock://bucket/registry/lm/1"
    assert resolve(registry, "lm:latest").manifest["metrics"] == {"val_loss": 1.0}
    assert register(registry, "lm", tmp_path / "c", {})[1] is False
    local = version.path.download(tmp_path / "served")
    assert load_pretrained(str(local)).config.n_layer == 2


def test_a_version_another_registration_is_writing_is_never_taken_or_deleted(tmp_path):
    """Another registration has claimed `lm/1` and is copying its files (no manifest yet): this one takes 2 and
    leaves 1 alone; with no directory rename anywhere (object stores have none)."""
    registry = tmp_path / "registry"
    (registry / "lm" / "1").mkdir(parents=True)
    (registry / "lm" / "1" / ".claim").write_text("{}")
    (registry / "lm" / "1" / "model.safetensors").write_bytes(b"the other registration's weights")

    version, _ = register(registry, "lm", make_checkpoint(tmp_path / "c", 0), {})
    assert version.version == 2 and resolve(registry, "lm:2").manifest["weights_sha256"]
    assert (registry / "lm" / "1" / "model.safetensors").read_bytes() == b"the other registration's weights"
    assert list_models(registry) == {"lm": [2]}

    def failing_gate(staged) -> dict:
        raise RuntimeError("the gate crashed")

    with pytest.raises(RuntimeError, match="the gate crashed"):
        register(registry, "lm", make_checkpoint(tmp_path / "d", 1), {}, gate=failing_gate)
    assert not (registry / "lm" / "3").exists()  # its own folder removed, claim and all; 1 untouched
    assert (registry / "lm" / "1" / "model.safetensors").is_file()


def test_a_corrupt_version_manifest_is_named_and_skipped(tmp_path, capsys):
    registry = tmp_path / "registry"
    register(registry, "lm", make_checkpoint(tmp_path / "c0", 0), {})
    (registry / "lm" / "1" / "manifest.json").write_text('{"name": "lm", "vers')  # cut short
    second, new = register(registry, "lm", make_checkpoint(tmp_path / "c1", 1), {})
    assert (second.version, new) == (2, True)
    assert f"skipping {registry / 'lm' / '1' / 'manifest.json'} is corrupt" in capsys.readouterr().err
    with pytest.raises(RegistryError, match=r"lm/1/manifest\.json is corrupt"):
        resolve(registry, "lm:1")
    assert resolve(registry, "lm:latest").version == 2


@pytest.mark.parametrize("ref", ["tiny:²", "tiny:٣", "../etc:1", "tiny:-1", "a/b:1"])
def test_references_that_are_no_version_are_explained(tmp_path, ref):
    registry = tmp_path / "registry"
    register(registry, "tiny", make_checkpoint(tmp_path / "c", 0), {})
    with pytest.raises(RegistryError, match=r"has versions \[1\]|is not a model name"):
        resolve(registry, ref)


def test_a_corrupt_aliases_file_is_named(tmp_path):
    registry = tmp_path / "registry"
    register(registry, "lm", make_checkpoint(tmp_path / "c", 0), {})
    for broken in ("{not json", '["best"]', '{"best": {"version": "²"}}'):
        (registry / "lm" / "aliases.json").write_text(broken)
        with pytest.raises(RegistryError, match=r"aliases\.json is corrupt .* `raylm models promote`"):
            resolve(registry, "lm:best")


def test_promotions_at_once_never_leave_the_worse_model_best(tmp_path):
    """The worse model's promotion read the aliases before the better one was promoted: its conditional write
    fails, it reads the new best, is asked again, and stands down (a plain write would have made it best)."""
    import threading

    registry = tmp_path / "registry"
    better, worse = (register(registry, "lm", make_checkpoint(tmp_path / f"c{s}", s), {})[0] for s in (0, 1))
    loss = {better.version: 1.0, worse.version: 2.0, None: float("inf")}
    better_promoted = threading.Event()
    asked = []

    def worse_beats(current):
        asked.append(current)
        if len(asked) == 1:
            better_promoted.wait(10)  # compared against "no best", then the better one is promoted
        return loss[worse.version] < loss[current]

    racing = threading.Thread(target=lambda: set_best(registry, "lm", worse.version, "gate", worse_beats))
    racing.start()
    while not asked:
        pass
    assert set_best(registry, "lm", better.version, "gate", lambda current: loss[better.version] < loss[current])
    better_promoted.set()
    racing.join(10)
    assert asked == [None, better.version] and resolve(registry, "lm:best").version == better.version
    history = json.loads((registry / "lm" / "aliases.json").read_text())["history"]
    assert [entry["version"] for entry in history] == [better.version]


def test_registrations_at_once_each_get_a_whole_version(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from raylm.registry.store import weights_hash

    registry = tmp_path / "registry"
    checkpoints = [make_checkpoint(tmp_path / f"c{seed}", seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda c: register(registry, "lm", c, {})[0], checkpoints))
    assert sorted(v.version for v in versions) == [1, 2, 3, 4] and list_models(registry) == {"lm": [1, 2, 3, 4]}
    for checkpoint, version in zip(checkpoints, versions, strict=True):
        assert version.manifest["weights_sha256"] == weights_hash(Location.parse(checkpoint))
        assert weights_hash(version.path) == version.manifest["weights_sha256"]  # its own files, all of them


def test_a_remote_version_is_cached_whole_or_not_at_all(tmp_path, monkeypatch):
    """A replica serving from a remote registry copies the version into a local cache: a failed copy leaves
    nothing behind, and a copy another replica on the node finished first is used, its own partial one removed."""
    import dataclasses
    import shutil

    import pyarrow.fs as pafs

    from raylm.serving.source import _cached_copy

    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "cache"))
    registry = Location(pafs._MockFileSystem(), "bucket/registry")
    register(registry, "lm", make_checkpoint(tmp_path / "c", seed=0), {})
    found = resolve(registry, "lm:1")

    class OtherReplicaFinishesFirst(Location):
        def download(self, local_dir):
            super().download(local_dir)
            shutil.copytree(local_dir, local_dir.parent / local_dir.name.split(".")[1])  # the final name, taken
            return local_dir

    racing = dataclasses.replace(found, path=OtherReplicaFinishesFirst(found.path.fs, found.path.path))
    local = _cached_copy(racing)
    assert load_pretrained(str(local)).config.n_layer == 2
    assert [p.name for p in local.parent.iterdir()] == [local.name]  # no partial copy left

    shutil.rmtree(local)
    gone = dataclasses.replace(found, path=found.path.parent / "99")  # the files vanished from the registry
    with pytest.raises(OSError):
        _cached_copy(gone)
    assert list(local.parent.iterdir()) == []
    assert _cached_copy(found) == local and (local / "model.safetensors").is_file()


def test_latest_is_computed_best_is_stored_and_promoted_by_hand(tmp_path):
    registry = tmp_path / "registry"
    register(registry, "lm", make_checkpoint(tmp_path / "c1", seed=0), {})
    register(registry, "lm", make_checkpoint(tmp_path / "c2", seed=1), {})
    assert aliases_of(registry, "lm") == {"latest": 2}
    with pytest.raises(RegistryError, match=r"lm:best: no version of lm has been promoted yet.*versions: \[1, 2\]"):
        resolve(registry, "lm:best")

    found, previous = promote(registry, "lm:1")
    assert (found.version, previous) == (1, None)
    stored = json.loads((registry / "lm" / "aliases.json").read_text())
    assert stored["best"]["version"] == 1 and stored["best"]["reason"] == "promoted by hand"
    assert resolve(registry, "lm:best").version == 1 and resolve(registry, "lm:latest").version == 2
    assert version_aliases(registry, "lm", 1) == ["lm:best"] and version_aliases(registry, "lm", 2) == ["lm:latest"]
    assert describe_models(registry) == {"lm": {"versions": [1, 2], "latest": 2, "best": 1, "best_val_ppl": None}}

    assert promote(registry, "lm:latest")[1] == 1
    assert version_aliases(registry, "lm", 2) == ["lm:best", "lm:latest"]
    with pytest.raises(RegistryError, match="'lm:9': lm has versions"):
        promote(registry, "lm:9")
    set_best(registry, "lm", 7, "a version deleted by hand since")
    with pytest.raises(RegistryError, match="lm:best points at version 7, which is gone"):
        resolve(registry, "lm:best")


def registry_config(tmp_path, run: str = "a", *overrides: str):
    return load_config(None, [f"run.dir={tmp_path / 'runs'}", f"run.name={run}", "registry.name=lm", *overrides])


def stage_trained_run(cfg, checkpoint, val_loss: float, prepared_at: str = "2026-01-01T00:00:00+00:00") -> None:
    """What `raylm prepare` and `raylm train` leave for `raylm register`: a shards manifest and the run's result."""
    paths = RunPaths.of(cfg)
    manifest = {
        "format": "raylm.shards/1",
        "created_at": prepared_at,
        "seconds": 1.5,
        "tokenizer": {"hash": tokenizer_hash(Location.parse(checkpoint))},
        "splits": {"train": {"blocks": 40}, "val": {"blocks": 4}},
    }
    write_json(paths.data / "manifest.json", manifest)
    result = {"checkpoint": str(checkpoint), "val_loss": val_loss, "val_ppl": math.exp(val_loss), "step": 3}
    write_json(paths.train / "result.json", result)


def test_the_gate_promotes_the_first_model_and_then_only_better_ones(tmp_path):
    cfg = registry_config(tmp_path)
    stage_trained_run(cfg, make_checkpoint(tmp_path / "c1", seed=1), val_loss=5.0)
    first = run_register(cfg)
    assert first["promoted"] and first["best"] == "lm:1"
    assert first["gate"]["reason"] == "no version was promoted before: the first best"

    stage_trained_run(cfg, make_checkpoint(tmp_path / "c2", seed=2), val_loss=5.5)
    worse = run_register(cfg)
    assert (worse["version"], worse["promoted"], worse["best"]) == (2, False, "lm:1")
    gate = worse["gate"]
    assert not gate["passed"] and gate["best_version"] == 1 and not gate["best_reevaluated"]
    assert gate["best_val_loss"] == 5.0 and gate["candidate_val_ppl"] == pytest.approx(math.exp(5.5))
    assert gate["reason"] == (
        f"val_ppl {math.exp(5.5):.4g} is not better than the current best lm:1's {math.exp(5.0):.4g} "
        "(on the same validation data)"
    )
    assert resolve(cfg.run.dir + "/registry", "lm:2").manifest["gate"] == gate

    # Another run on the same shards (prepared again later: only the manifest's time differs) compares recorded
    # losses; no re-evaluation (there are no shards here to re-evaluate on: it would fail).
    other = registry_config(tmp_path, "b")
    stage_trained_run(other, make_checkpoint(tmp_path / "c3", seed=3), val_loss=4.0, prepared_at="2026-02-02")
    better = run_register(other)
    assert better["promoted"] and better["best"] == "lm:3" and not better["gate"]["best_reevaluated"]
    assert "beats the current best lm:1's" in better["gate"]["reason"]
    manifest = resolve(RunPaths.of(cfg).registry, "lm:best").manifest
    assert manifest["data_manifest_hash"] == first["gate"]["data_manifest_hash"] == better["gate"]["data_manifest_hash"]
    assert manifest["metrics"]["val_loss"] == 4.0

    # Registering an already registered checkpoint returns it, without gating it again.
    stage_trained_run(cfg, tmp_path / "c2", val_loss=5.5)
    again = run_register(cfg)
    assert (again["version"], again["new"], again["promoted"], again["gate"]) == (2, False, False, gate)
    assert describe_models(RunPaths.of(cfg).registry)["lm"] == {
        "versions": [1, 2, 3],
        "latest": 3,
        "best": 3,
        "best_val_ppl": round(math.exp(4.0), 4),
    }


@pytest.mark.parametrize(
    ("gate", "losses", "promoted"),
    [
        # Threshold only: under it is enough, even when worse than the best.
        (["registry.gate.compare_to_best=false", "registry.gate.max_val_ppl=100"], [5.0, 4.0, 4.5], [0, 1, 1]),
        # Both checks: under the threshold and better than the best.
        (["registry.gate.max_val_ppl=100"], [5.0, 4.0, 4.5, 3.9], [0, 1, 0, 1]),
        # No checks: every new version is promoted.
        (["registry.gate.compare_to_best=false"], [5.0, 6.0], [1, 1]),
    ],
)
def test_gate_checks_combine(tmp_path, gate, losses, promoted):
    cfg = registry_config(tmp_path, "a", *gate)
    outcomes = []
    for seed, loss in enumerate(losses):
        stage_trained_run(cfg, make_checkpoint(tmp_path / f"c{seed}", seed=seed), val_loss=loss)
        outcomes.append(run_register(cfg))
    assert [int(outcome["promoted"]) for outcome in outcomes] == promoted
    if "registry.gate.max_val_ppl=100" in gate:
        assert outcomes[0]["gate"]["reason"].startswith(f"val_ppl {math.exp(5.0):.4g} is not under")
        assert "registry.gate.max_val_ppl=100" in outcomes[0]["gate"]["reason"]
    if len(gate) == 1 and "max_val_ppl" in gate[0]:
        assert "not better than the current best lm:2's" in outcomes[2]["gate"]["reason"]
    if gate == ["registry.gate.compare_to_best=false"]:
        assert outcomes[1]["gate"]["reason"] == "the eval gate has no checks enabled"


def test_secrets_never_enter_manifests_or_stage_markers(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "sk-apikey-never-on-disk")
    cfg = registry_config(
        tmp_path,
        "a",
        "train.mlflow_tracking_uri=https://u:hunter2secret@mlflow.example",
        "data.paths=['s3://bucket/corpus.jsonl?access_key=AKIDLEAKED&secret_key=wJalrLEAKED&region=eu-west-1']",
    )
    claim_stage(cfg, "train", restart=False)  # writes train/stage.json
    stage_trained_run(cfg, make_checkpoint(tmp_path / "c", seed=0), val_loss=5.0)
    summary = run_register(cfg)

    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert {p.name for p in written} >= {"manifest.json", "aliases.json", "stage.json", "tokenizer.json"}
    for path in written:
        text = path.read_text(errors="replace")
        for secret in ("hunter2secret", "AKIDLEAKED", "wJalrLEAKED", "sk-apikey-never-on-disk"):
            assert secret not in text, f"{secret} in {path}"
    assert "hunter2secret" not in json.dumps(summary)
    config = resolve(RunPaths.of(cfg).registry, "lm:1").manifest["config"]
    # Redacted, not dropped: the lineage still says where metrics went and which data was read.
    assert config["train"]["mlflow_tracking_uri"] == "https://u:***@mlflow.example"
    assert config["data"]["paths"] == ["s3://bucket/corpus.jsonl?access_key=***&secret_key=***&region=eu-west-1"]


@pytest.fixture
def cli():
    # The CLI installs a SIGTERM handler for its stage: give the test session its own back.
    handler = signal.getsignal(signal.SIGTERM)
    yield CliRunner()
    signal.signal(signal.SIGTERM, handler)


def test_cli_says_why_a_model_is_not_promoted_and_promotes_by_hand(tmp_path, cli):
    from raylm.cli import app

    cfg = registry_config(tmp_path)
    overrides = [f"run.dir={cfg.run.dir}", "run.name=a", "registry.name=lm"]
    stage_trained_run(cfg, make_checkpoint(tmp_path / "c1", seed=1), val_loss=4.0)
    assert json.loads(cli.invoke(app, ["register", *overrides]).stdout)["promoted"] is True
    stage_trained_run(cfg, make_checkpoint(tmp_path / "c2", seed=2), val_loss=4.5)

    result = cli.invoke(app, ["register", *overrides])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["model"], summary["promoted"], summary["best"]) == ("lm:2", False, "lm:1")
    assert "lm:2 registered but NOT promoted to lm:best" in result.stderr
    assert "is not better than the current best lm:1's" in result.stderr
    assert "raylm models promote lm:2" in result.stderr

    listed = cli.invoke(app, ["models", "list", *overrides])
    assert json.loads(listed.stdout)["models"]["lm"]["best"] == 1
    assert f"lm: versions [1, 2], latest lm:2, best lm:1 (val_ppl {math.exp(4.0):.4g})" in listed.stderr

    promoted = cli.invoke(app, ["models", "promote", "lm:2", *overrides])
    assert promoted.exit_code == 0 and json.loads(promoted.stdout)["previous"] == 1
    shown = json.loads(cli.invoke(app, ["models", "show", "lm:best", *overrides]).stdout)
    assert shown["model"] == "lm:2" and shown["aliases"] == ["lm:best", "lm:latest"]
    assert shown["gate"]["passed"] is False and shown["data_manifest_hash"]
    assert json.loads((tmp_path / "runs" / "registry" / "lm" / "aliases.json").read_text())["best"]["reason"] == (
        "promoted by hand"
    )
    missing = cli.invoke(app, ["models", "promote", "lm:5", *overrides])
    assert missing.exit_code == 1 and "'lm:5': lm has versions [1, 2]" in missing.stderr


def test_a_crash_between_registering_and_promoting_is_finished_by_a_rerun(tmp_path, monkeypatch):
    import raylm.registry.register as registry_module

    cfg = registry_config(tmp_path)
    stage_trained_run(cfg, make_checkpoint(tmp_path / "c1", seed=1), val_loss=5.0)
    promote_for_real = registry_module.set_best

    def killed(*args, **kwargs):
        raise SystemExit("killed after registering, before promoting")

    monkeypatch.setattr(registry_module, "set_best", killed)
    with pytest.raises(SystemExit):
        run_register(cfg)
    monkeypatch.setattr(registry_module, "set_best", promote_for_real)
    assert aliases_of(RunPaths.of(cfg).registry, "lm") == {"latest": 1}  # registered, not promoted

    again = run_register(cfg)
    assert (again["new"], again["promoted"], again["best"]) == (False, True, "lm:1")
    # Once promoted, a version replaced by hand since is not promoted again by a rerun.
    registry = RunPaths.of(cfg).registry
    register(registry, "lm", make_checkpoint(tmp_path / "c2", seed=2), {})
    promote(registry, "lm:2")
    assert run_register(cfg)["best"] == "lm:2"


def test_cli_explains_what_it_cannot_do_in_one_line(tmp_path, cli):
    """No traceback for a reference that is no version, a corrupt aliases.json, an export nowhere writable, a run.dir
    nowhere writable (exit 2, before any cluster starts)."""
    from raylm.cli import app

    cfg = registry_config(tmp_path)
    overrides = [f"run.dir={cfg.run.dir}", "run.name=a", "registry.name=lm"]
    checkpoint = make_checkpoint(tmp_path / "c1", seed=1)
    register(RunPaths.of(cfg).registry, "tiny", checkpoint, {})
    shown = cli.invoke(app, ["models", "show", "tiny:²", *overrides])
    assert shown.exit_code == 1 and "'tiny:²': tiny has versions [1]" in shown.stderr, shown.output
    (tmp_path / "runs" / "registry" / "tiny" / "aliases.json").write_text("{oops")
    for verb in (["models", "list"], ["models", "show", "tiny:best"], ["models", "promote", "tiny:1"]):
        result = cli.invoke(app, [*verb, *overrides])
        assert result.exit_code == 1 and "aliases.json is corrupt" in result.stderr, (verb, result.output)
        assert "Traceback" not in result.output

    (tmp_path / "a-file").write_text("not a directory")
    exported = cli.invoke(app, ["export", str(checkpoint), str(tmp_path / "a-file" / "out")])
    assert exported.exit_code == 1 and f"cannot export {checkpoint} to {tmp_path / 'a-file' / 'out'}" in exported.stderr
    assert "Traceback" not in exported.output
    for verb in ("prepare", "train", "register"):
        result = cli.invoke(app, [verb, f"run.dir={tmp_path / 'a-file' / 'runs'}", "run.name=a"])
        assert result.exit_code == 2, (verb, result.output)
        assert f"run.dir={tmp_path / 'a-file' / 'runs'} is not writable from here" in result.stderr
