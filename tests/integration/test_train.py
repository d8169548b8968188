"""train with 2 real Ray Train workers (DDP over gloo) on the prepared shards."""

import math
from pathlib import Path

import pytest

from raylm.cluster import plan_resources
from raylm.runs import RunPaths
from raylm.train.trainer import run_train

pytestmark = pytest.mark.timeout(420)


def test_two_workers_loss_falls_and_checkpoint_loads(prepared):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, data = prepared
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 2})})
    plan = plan_resources(cfg, embedded=True)
    summary = run_train(cfg, plan)

    assert summary["step"] == cfg.train.max_steps
    assert summary["tokens_seen"] == cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len
    # An untrained model scores about ln(vocab); a dozen steps on this tiny corpus must do clearly better.
    assert summary["val_loss"] < math.log(data["vocab_size"]) - 0.5
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)

    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "raylm_checkpoint.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tokenizer("The river carried", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    # Running the same run again reuses the finished result instead of training again.
    assert run_train(cfg, plan) == summary
    assert (RunPaths.of(cfg).train / "result.json").is_file()
