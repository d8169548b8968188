"""Checkpoint integrity without Ray: every file's SHA-256 in the manifest, checked where a checkpoint is chosen
(newest first, the first good one wins, each one passed over named), registered or exported; a symbolic link inside
a checkpoint is never followed."""

import json
import os

import pytest
import torch

from raylm.config import ModelSection
from raylm.data.tokenizer import train_bpe
from raylm.models import build_model
from raylm.registry.store import RegistryError, register
from raylm.storage import Location
from raylm.train.checkpoint import (
    CHECKPOINT_MANIFEST,
    CheckpointError,
    checkpoint_problem,
    choose_checkpoint,
    export_checkpoint,
    read_checkpoint_manifest,
    resume_warning,
    save_checkpoint,
)


def _checkpoints(run_dir, steps):
    torch.manual_seed(0)
    tokenizer = train_bpe(["hello world", "hello there"] * 20, vocab_size=300)
    tokenizer_dir = run_dir.parent / "tok"
    tokenizer.save_pretrained(str(tokenizer_dir))
    model = build_model(ModelSection(), len(tokenizer), 16, tokenizer.eos_token_id, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    made = []
    for index, step in enumerate(steps):
        directory = run_dir / f"checkpoint_2026-12-0{index + 1}"
        save_checkpoint(directory, model, tokenizer_dir, optimizer, scheduler, {"step": step, "tokens_seen": 0}, {})
        made.append(directory)
    return made


def test_the_manifest_records_each_files_size_and_sha256(tmp_path):
    (checkpoint,) = _checkpoints(tmp_path / "run", [3])
    files = read_checkpoint_manifest(checkpoint)["files"]
    weights = files["model.safetensors"]
    assert weights["size"] == (checkpoint / "model.safetensors").stat().st_size and len(weights["sha256"]) == 64
    assert set(files) == {p.name for p in checkpoint.iterdir()} - {CHECKPOINT_MANIFEST}


def test_the_newest_good_checkpoint_is_chosen_and_each_bad_newer_one_named(tmp_path):
    run = tmp_path / "run"
    oldest, middle, newest = _checkpoints(run, [3, 6, 9])
    assert choose_checkpoint(Location.parse(run)) == (Location.parse(newest), [])
    assert choose_checkpoint(Location.parse(run), Location.parse(middle))[0] == Location.parse(middle)  # Ray's latest

    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    assert checkpoint_problem(newest) is None  # the cheap check cannot see it
    assert "does not match the SHA-256" in checkpoint_problem(newest, verify=True)
    (middle / CHECKPOINT_MANIFEST).write_text("")  # empty, as a crash mid-write leaves it

    chosen, passed_over = choose_checkpoint(Location.parse(run), Location.parse(newest))
    assert chosen == Location.parse(oldest)
    assert len(passed_over) == 2 and f"{weights} does not match the SHA-256" in passed_over[0]
    assert f"{middle / CHECKPOINT_MANIFEST} is not valid JSON" in passed_over[1]
    warning = resume_warning(chosen, passed_over)
    assert f"resuming from {oldest}" in warning and str(weights) in warning

    (oldest / CHECKPOINT_MANIFEST).write_text(json.dumps(["not", "a", "manifest"]))
    assert "is not a checkpoint manifest" in checkpoint_problem(oldest)
    chosen, passed_over = choose_checkpoint(Location.parse(run), Location.parse(newest))
    assert chosen is None and "starting from scratch" in resume_warning(chosen, passed_over)


def test_a_symbolic_link_in_a_checkpoint_is_never_followed(tmp_path):
    (checkpoint,) = _checkpoints(tmp_path / "run", [3])
    outside = tmp_path / "elsewhere.json"
    tokenizer = checkpoint / "tokenizer.json"
    outside.write_bytes(tokenizer.read_bytes())  # same bytes, same size: the link passes every other check
    tokenizer.unlink()
    os.symlink(outside, tokenizer)
    assert "tokenizer.json is a symbolic link" in checkpoint_problem(checkpoint)
    with pytest.raises(RegistryError, match="symbolic link"):
        register(tmp_path / "registry", "lm", checkpoint, {})
    with pytest.raises(CheckpointError, match="symbolic link"):
        export_checkpoint(checkpoint, tmp_path / "exported")
    assert not (tmp_path / "exported" / "tokenizer.json").exists()

    # A link the manifest does not even list is not copied either.
    tokenizer.unlink()
    tokenizer.write_bytes(outside.read_bytes())
    os.symlink("/etc/hostname", checkpoint / "notes.txt")
    with pytest.raises(CheckpointError, match=r"notes\.txt: a symbolic link"):
        export_checkpoint(checkpoint, tmp_path / "exported2")
