"""The registry's eval gate on real shards: a best measured on other data is evaluated again on the candidate's
validation split; a best with another tokenizer cannot be compared."""

import math
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import torch.nn.functional as F

from raylm.config import load_config
from raylm.data.prepare import run_prepare
from raylm.data.shards import read_manifest, read_split_blocks
from raylm.data.tokenizer import train_bpe
from raylm.models import build_model, load_pretrained
from raylm.registry.aliases import resolve
from raylm.registry.gate import data_identity, measure
from raylm.registry.register import run_register
from raylm.registry.store import register
from raylm.runs import RunPaths
from raylm.storage import Location, write_json
from raylm.tasks.causal_lm import lm_loss
from raylm.train.checkpoint import save_checkpoint
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(300)


def checkpoint(cfg, directory, data_dir, seed: int, train_steps: int = 0):
    """A checkpoint as training writes it, with the data dir's tokenizer: untrained, or trained a few steps on the
    data dir's train split."""
    torch.manual_seed(seed)
    tokenizer = read_manifest(data_dir).tokenizer
    model = build_model(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, tokenizer.eos_id, tokenizer.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    blocks = torch.from_numpy(read_split_blocks(data_dir, "train").astype(np.int64))
    for step in range(train_steps):
        start = (step * 8) % max(1, len(blocks) - 8)
        lm_loss(model, blocks[start : start + 8]).backward()
        optimizer.step()
        optimizer.zero_grad()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    position = {"step": train_steps, "tokens_seen": 0}
    save_checkpoint(directory, model, data_dir.local / "tokenizer", optimizer, scheduler, position, {})
    return directory


def direct_val_loss(model_dir, data_dir) -> float:
    """The validation loss computed here, in one forward pass over the whole split (not through raylm's evaluate)."""
    model = load_pretrained(str(model_dir)).eval()
    blocks = torch.from_numpy(read_split_blocks(data_dir, "val").astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1)).item()


def test_the_gate_reevaluates_a_best_from_other_data_and_refuses_another_tokenizer(prepared, tmp_path):
    source_cfg, _ = prepared
    runs = tmp_path / "runs"
    shutil.copytree(RunPaths.of(source_cfg).data.local, runs / "a" / "data")
    cfg_a = load_config(None, [*tiny_overrides(runs, "a"), "registry.name=lm"])
    tokenizer_dir = runs / "a" / "data" / "tokenizer"
    # Run b: other shards (another validation split) made with the same tokenizer.
    same_tokenizer = [f"data.tokenizer.path={tokenizer_dir}", "data.val_fraction=0.2"]
    cfg_b = load_config(None, [*tiny_overrides(runs, "b"), "registry.name=lm", *same_tokenizer])
    run_prepare(cfg_b)
    data_a, data_b = RunPaths.of(cfg_a).data, RunPaths.of(cfg_b).data
    (hash_a, tokenizer_a), (hash_b, tokenizer_b) = data_identity(data_a), data_identity(data_b)
    assert hash_a != hash_b and tokenizer_a == tokenizer_b

    # The first model, registered from an explicit checkpoint: the gate measures it on run a's validation split.
    first = run_register(cfg_a, str(checkpoint(cfg_a, tmp_path / "c1", data_a, seed=0)))
    assert first["promoted"] and first["gate"]["candidate_measured"]
    best_path = resolve(RunPaths.of(cfg_a).registry, "lm:1").path.local
    assert first["gate"]["candidate_val_loss"] == pytest.approx(direct_val_loss(best_path, data_a), rel=1e-5)
    assert resolve(RunPaths.of(cfg_a).registry, "lm:1").manifest["data_manifest_hash"] == hash_a

    # A better model from run b: the best was measured on other shards, so it is evaluated again on b's split.
    trained = checkpoint(cfg_b, tmp_path / "c2", data_b, seed=1, train_steps=30)
    second = run_register(cfg_b, str(trained))
    gate = second["gate"]
    assert gate["best_version"] == 1 and gate["best_reevaluated"] and gate["data_manifest_hash"] == hash_b
    assert math.isfinite(gate["best_val_loss"])
    assert gate["best_val_loss"] == pytest.approx(direct_val_loss(best_path, data_b), rel=1e-5)
    assert gate["candidate_val_loss"] == pytest.approx(direct_val_loss(trained, data_b), rel=1e-5)
    assert gate["candidate_val_loss"] < gate["best_val_loss"]
    assert second["promoted"] and second["best"] == "lm:2"
    assert "(re-evaluated on this run's validation data)" in gate["reason"]
    assert resolve(RunPaths.of(cfg_b).registry, "lm:2").manifest["gate"] == gate

    # A model with another tokenizer, reporting a far lower loss: not comparable, so not promoted.
    other_tokenizer = tmp_path / "other-tokenizer"
    train_bpe(["completely different words here"] * 50, vocab_size=300).save_pretrained(str(other_tokenizer))
    torch.manual_seed(2)
    model = build_model(cfg_a.model, 300, cfg_a.data.seq_len, 0, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "c3", model, other_tokenizer, optimizer, scheduler, {"step": 1, "tokens_seen": 0}, {})
    cfg_c = load_config(None, [*tiny_overrides(runs, "c"), "registry.name=lm"])
    write_json(RunPaths.of(cfg_c).train / "result.json", {"checkpoint": str(tmp_path / "c3"), "val_loss": 0.5})
    third = run_register(cfg_c)
    assert (third["version"], third["promoted"], third["best"]) == (3, False, "lm:2")
    assert not third["gate"]["best_reevaluated"] and third["gate"]["best_val_loss"] is None
    assert third["gate"]["reason"] == (
        "the current best lm:2 uses another tokenizer, so their perplexities are not comparable "
        "(promote by hand with `raylm models promote`)"
    )


def test_a_model_in_a_remote_registry_is_downloaded_to_be_measured(prepared, tmp_path):
    cfg, _ = prepared
    data = RunPaths.of(cfg).data
    registry = Location(pafs._MockFileSystem(), "bucket/registry")
    version, _ = register(registry, "remote", checkpoint(cfg, tmp_path / "c", data, seed=3), {})
    measured = measure(version.path, data)
    assert measured["val_tokens"] == read_split_blocks(data, "val")[:, 1:].size
    assert measured["val_loss"] == pytest.approx(direct_val_loss(tmp_path / "c", data), rel=1e-5)
    assert measured["val_ppl"] == pytest.approx(math.exp(measured["val_loss"]))
