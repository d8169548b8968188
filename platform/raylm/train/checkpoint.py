"""Training checkpoints: a Hugging Face model directory (safetensors) plus everything needed to resume.

    config.json, model.safetensors, generation_config.json   the model (`save_pretrained`)
    tokenizer.json, tokenizer_config.json, ...                the tokenizer the shards were made with
    train_state.pt                                            optimizer, scheduler and RNG state
    raylm_checkpoint.json                                     step, tokens seen, metrics, each file's size and
                                                              SHA-256 (hashed in the local directory before
                                                              upload): written last

A directory without a readable `raylm_checkpoint.json`, with a symbolic link, or whose files do not match the sizes
recorded there, is incomplete; one whose files do not match their SHA-256 is corrupt. Sizes are cheap and checked
everywhere; hashes are checked where a checkpoint is chosen (`choose_checkpoint`, on the driver, newest first,
stopping at the first good one), registered or exported.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from raylm.digests import sha256_of
from raylm.errors import RunError
from raylm.storage import Location, read_json, write_json

CHECKPOINT_FORMAT = "raylm.checkpoint/2"


class CheckpointError(RunError):
    """A checkpoint that cannot be used as asked (incomplete, corrupt, holding a link) or a target already taken."""


CHECKPOINT_MANIFEST = "raylm_checkpoint.json"
TRAIN_STATE = "train_state.pt"
MODEL_FILES = ("config.json", "model.safetensors")


@dataclass
class Position:
    """Where a run stands in its data and steps: what a checkpoint records so that resuming continues exactly here."""

    step: int = 0
    tokens_seen: int = 0
    samples_consumed: int = 0
    epoch: int = 0
    ledgers: list[dict[str, Any]] | None = None
    """Every rank's ledger of the blocks it trained on (at the last evaluation)."""
    workers: list[dict[str, Any]] | None = None
    """Every rank's facts (node, device, peak memory) at the last evaluation."""

    @classmethod
    def recorded(cls, manifest: dict[str, Any]) -> Position:
        return cls(**{k: manifest[k] for k in ("step", "tokens_seen", "samples_consumed", "epoch") if k in manifest})

    def advance(self, batch_size: int, tokens: int, train_blocks: int) -> None:
        self.step += 1
        self.tokens_seen += tokens
        self.samples_consumed = self.step * batch_size
        self.epoch = self.samples_consumed // train_blocks

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def save_checkpoint(
    directory: Path,
    model,
    tokenizer_dir: Path,
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: Position | dict[str, Any],
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
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_of(Location.parse(p))}
        for p in sorted(directory.iterdir())
        if p.name != CHECKPOINT_MANIFEST
    }
    recorded = position.record() if isinstance(position, Position) else position
    write_json(
        directory / CHECKPOINT_MANIFEST, {"format": CHECKPOINT_FORMAT, **recorded, "metrics": metrics, "files": files}
    )


def _manifest(directory: Location) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's manifest, or why there is none to trust (missing, empty, truncated, not a manifest)."""
    path = directory / CHECKPOINT_MANIFEST
    if not path.is_file():
        return None, f"{path} is missing (the checkpoint was not finished)"
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:  # empty, truncated, not UTF-8
        return None, f"{path} is not valid JSON ({err})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        return None, f"{path} is not a checkpoint manifest (no step or files)"
    return manifest, None


def _is_link(path: Location) -> bool:
    return path.is_local and Path(path.path).is_symlink()


def checkpoint_problem(directory: Location | Path | str, verify: bool = False) -> str | None:
    """Why `directory` (on any pyarrow filesystem) is not a complete checkpoint, or None when it is. `verify` also
    hashes every file against the manifest (a flipped byte keeps the size)."""
    directory = Location.parse(directory)
    manifest, problem = _manifest(directory)
    if problem:
        return problem
    for name, entry in manifest["files"].items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256"))
        path = directory / name
        if _is_link(path):
            return f"{path} is a symbolic link (a checkpoint holds regular files only)"
        if not path.is_file():
            return f"{path} is missing"
        if path.size() != size:
            return f"{path} has {path.size()} bytes, the manifest says {size}"
        if verify and digest and sha256_of(path) != digest:
            return f"{path} does not match the SHA-256 its manifest records (corrupted)"
    missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
    return f"{directory} has no {missing[0]}" if missing else None


def copy_model_files(checkpoint: Location, target: Location) -> None:
    """The checkpoint as a plain Hugging Face model directory: model, config, tokenizer; no optimizer state."""
    links = [item for item in checkpoint.iterdir() if _is_link(item)]
    if links:  # never followed: a link could point anywhere on this machine
        raise CheckpointError(f"refusing to copy {links[0]}: a symbolic link (a checkpoint holds regular files only)")
    target.mkdir()
    for item in checkpoint.iterdir():
        if item.is_file() and item.name not in (TRAIN_STATE, CHECKPOINT_MANIFEST):
            pafs.copy_files(item.path, (target / item.name).path, checkpoint.fs, target.fs)


def export_checkpoint(checkpoint: Location | Path | str, out_dir: Location | Path | str) -> Location:
    """`raylm export`: a complete checkpoint -> a model directory any `from_pretrained` loads."""
    checkpoint, out_dir = Location.parse(checkpoint), Location.parse(out_dir)
    problem = checkpoint_problem(checkpoint, verify=True)
    if problem:
        raise CheckpointError(f"cannot export an incomplete or corrupt checkpoint: {problem}")
    if out_dir.exists() and out_dir.iterdir():
        raise CheckpointError(f"{out_dir} exists and is not empty")
    copy_model_files(checkpoint, out_dir)
    return out_dir


def choose_checkpoint(run_dir: Location, latest: Location | None = None) -> tuple[Location | None, list[str]]:
    """Where a run resumes: its newest complete checkpoint with every file matching its hash, checked newest first
    (`latest`, Ray Train's latest reported checkpoint, then the rest by name: Ray names them by time) and stopping at
    the first good one. Returns it (None: start from scratch) and why each newer one was passed over."""
    order = sorted(checkpoint_dirs(run_dir), key=lambda c: c.name, reverse=True)
    order.sort(key=lambda c: c != latest)  # stable: Ray's latest first, the rest newest first
    passed_over = []
    for candidate in order:
        problem = checkpoint_problem(candidate, verify=True)
        if problem is None:
            return candidate, passed_over
        passed_over.append(f"passed over {candidate}: {problem}")
    return None, passed_over


def checkpoint_dirs(run_dir: Location) -> list[Location]:
    """The run's checkpoint folders (Ray Train keeps `checkpoint_manager_snapshot.json` beside them)."""
    return [c for c in run_dir.glob("checkpoint_*") if c.is_dir()]


def resume_warning(chosen: Location | None, passed_over: list[str]) -> str | None:
    if not passed_over:
        return None
    then = f"resuming from {chosen}" if chosen else "no complete checkpoint is left: starting from scratch"
    return f"the latest checkpoint is incomplete or corrupt ({'; '.join(passed_over)}); {then}"


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
