import json

import pytest
import torch

from raylm.config import ModelSection
from raylm.data.tokenizer import train_bpe
from raylm.models import build_model, load_pretrained
from raylm.registry import RegistryError, list_models, register, resolve
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
    with pytest.raises(RegistryError, match=r"'lm:7': lm has versions \[1\]"):
        resolve(registry, "lm:7")


def test_incomplete_checkpoints_are_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "c", seed=0)
    (checkpoint / CHECKPOINT_MANIFEST).unlink()
    assert "missing" in checkpoint_problem(checkpoint)
    with pytest.raises(RegistryError, match="incomplete checkpoint"):
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
