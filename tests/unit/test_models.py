import json
import subprocess
import sys

import pytest
import torch

from raylm.config import ModelSection
from raylm.models import ModelLoadError, build_model, load_pretrained
from raylm.train.checkpoint import TRAIN_STATE
from tests.conftest import REPO
from tests.unit.test_registry import make_checkpoint


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_presets_build_train_and_round_trip_through_safetensors(preset, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSection(preset=preset), vocab_size=300, seq_len=32, eos_id=0, pad_id=1)
    blocks = torch.randint(0, 300, (2, 33))
    loss = torch.nn.functional.cross_entropy(
        model(input_ids=blocks[:, :-1]).logits.reshape(-1, 300), blocks[:, 1:].reshape(-1)
    )
    loss.backward()
    assert torch.isfinite(loss)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    again = load_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        inputs = blocks[:, :-1]
        assert torch.allclose(model.eval()(input_ids=inputs).logits, again(input_ids=inputs).logits)


def test_pickle_only_weights_are_refused(tmp_path):
    model = build_model(ModelSection(), vocab_size=300, seq_len=16, eos_id=0, pad_id=1)
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights"):
        load_pretrained(str(tmp_path))


def test_export_writes_a_plain_model_directory(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=0)
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "export", str(checkpoint), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model_dir"] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / TRAIN_STATE).exists()
    assert load_pretrained(str(out)).config.n_layer == 2
    again = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "export", str(checkpoint), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
