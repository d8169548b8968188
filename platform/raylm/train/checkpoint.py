"""Training checkpoints: a Hugging Face model directory (safetensors) plus everything needed to resume.

    config.json, model.safetensors, generation_config.json   the model (`save_pretrained`)
    tokenizer.json, tokenizer_config.json, ...                the tokenizer the shards were made with
    train_state.pt                                            optimizer, scheduler and RNG state
    raylm_checkpoint.json                                     step, tokens seen, metrics, file sizes: written last

A directory without `raylm_checkpoint.json`, or whose files do not match the sizes recorded there, is incomplete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from raylm.runs import read_json, write_json
from raylm.storage import Location

CHECKPOINT_MANIFEST = "raylm_checkpoint.json"
TRAIN_STATE = "train_state.pt"
MODEL_FILES = ("config.json", "model.safetensors")


def save_checkpoint(
    directory: Path,
    model,
    tokenizer_dir: Path,
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: dict[str, Any],
    metrics: dict[str, Any],
    scaler=None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, directory / item.name)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, directory / TRAIN_STATE)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != CHECKPOINT_MANIFEST}
    write_json(
        directory / CHECKPOINT_MANIFEST,
        {"format": "raylm.checkpoint/1", **position, "metrics": metrics, "files": files},
    )


def checkpoint_problem(directory: Location | Path | str) -> str | None:
    """Why `directory` (on any pyarrow filesystem) is not a complete checkpoint, or None when it is."""
    directory = Location.parse(directory)
    manifest_path = directory / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the checkpoint was not finished)"
    for name, size in read_json(manifest_path)["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.size() != size:
            return f"{path} has {path.size()} bytes, the manifest says {size}"
    missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
    return f"{directory} has no {missing[0]}" if missing else None


def copy_model_files(checkpoint: Location, target: Location) -> None:
    """The checkpoint as a plain Hugging Face model directory: model, config, tokenizer; no optimizer state."""
    target.mkdir()
    for item in checkpoint.iterdir():
        if item.is_file() and item.name not in (TRAIN_STATE, CHECKPOINT_MANIFEST):
            pafs.copy_files(item.path, (target / item.name).path, checkpoint.fs, target.fs)


def export_checkpoint(checkpoint: Location | Path | str, out_dir: Location | Path | str) -> Location:
    """`raylm export`: a complete checkpoint -> a model directory any `from_pretrained` loads."""
    checkpoint, out_dir = Location.parse(checkpoint), Location.parse(out_dir)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"cannot export an incomplete checkpoint: {problem}")
    if out_dir.exists() and out_dir.iterdir():
        raise ValueError(f"{out_dir} exists and is not empty")
    copy_model_files(checkpoint, out_dir)
    return out_dir


def resume_checkpoint(latest: Location | None, run_dir: Location) -> tuple[Location | None, str | None]:
    """Where to resume: `latest` (Ray Train's latest reported checkpoint) when complete, else the complete
    checkpoint of `run_dir` with the most steps. Returns it and, when `latest` was passed over, why."""
    if latest is not None and checkpoint_problem(latest) is None:
        return latest, None
    problem = checkpoint_problem(latest) if latest is not None else None
    complete = [c for c in run_dir.glob("checkpoint_*") if checkpoint_problem(c) is None]
    best = max(complete, key=lambda c: read_checkpoint_manifest(c)["step"], default=None)
    if problem:
        fallback = f"resuming from {best}" if best else "no complete checkpoint is left: starting from scratch"
        return best, f"the latest checkpoint is incomplete or corrupt ({problem}); {fallback}"
    return best, None


def read_checkpoint_manifest(directory: Location | Path | str) -> dict[str, Any]:
    return read_json(Location.parse(directory) / CHECKPOINT_MANIFEST)


def restore_checkpoint(directory: Path, model, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Load weights and optimizer/scheduler/RNG state into the given objects; return the recorded position."""
    from safetensors.torch import load_model

    problem = checkpoint_problem(directory)
    if problem:
        raise RuntimeError(f"cannot resume: {problem}")
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    # save_pretrained leaves out tied weights (GPT-2's lm_head is the embedding); anything else missing is an error.
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name not in missing}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(f"cannot resume from {directory}: missing {untied}, unexpected {unexpected}")
    # Loaded on the CPU: the optimizer moves its state to the parameters' device itself.
    state = torch.load(directory / TRAIN_STATE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return read_checkpoint_manifest(directory)
