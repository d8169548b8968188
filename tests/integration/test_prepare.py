"""prepare with real Ray Data on the fixed test corpus: exact counts, every token in exactly one block, cache."""

import json
from collections import Counter

import pytest

from raylm.config import load_config
from raylm.data.prepare import run_prepare
from raylm.data.shards import read_manifest, read_split_blocks
from raylm.data.sources import DataError, split_of
from tests.conftest import ASSETS, tiny_overrides

pytestmark = pytest.mark.timeout(300)


def _documents() -> list[str]:
    return [json.loads(line)["text"] for line in (ASSETS / "corpus.jsonl").read_text().splitlines()]


def test_counts_are_exact_and_every_token_lands_once(prepared):
    from transformers import AutoTokenizer

    cfg, summary = prepared
    data_dir = __import__("pathlib").Path(summary["data_dir"])
    manifest = read_manifest(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    docs = _documents()
    kept = [d for d in docs if d.strip()]
    assert summary["documents"] == len(kept) == 238
    assert summary["empty_documents"] == 2
    assert summary["cache"] == "miss"

    block_len = cfg.data.seq_len + 1
    for split in ("train", "val"):
        stream = []
        for doc in kept:
            if split_of(doc, cfg.data.seed, cfg.data.val_fraction) == split:
                stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        info = manifest["splits"][split]
        blocks = read_split_blocks(data_dir, split)
        assert info["tokens"] == len(stream)
        assert blocks.shape == (info["blocks"], block_len)
        assert info["blocks"] == len(stream) // block_len, "only the split's last partial block is dropped"
        assert info["blocks"] * block_len + info["dropped_tokens"] == len(stream)
        # Exactly once: the blocks hold a sub-multiset of the stream, missing only the dropped tokens.
        missing = Counter(stream) - Counter(blocks.reshape(-1).tolist())
        assert sum(missing.values()) == info["dropped_tokens"]
        assert not Counter(blocks.reshape(-1).tolist()) - Counter(stream)
    assert manifest["splits"]["val"]["blocks"] > 0 and manifest["splits"]["train"]["blocks"] > 0
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer)


def test_rerun_is_a_cache_hit(prepared):
    cfg, first = prepared
    again = run_prepare(cfg)
    assert again["cache"] == "hit"
    assert {k: v for k, v in again.items() if k != "cache"} == {k: v for k, v in first.items() if k != "cache"}


def test_text_files_one_document_per_line(ray_cluster, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tmp_path), f"data.paths=[{ASSETS / 'corpus.txt'}]", "data.format=text"])
    summary = run_prepare(cfg)
    assert summary["documents"] == 238 and summary["empty_documents"] == 0


def test_invalid_jsonl_line_is_named(ray_cluster, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tmp_path), f"data.paths=[{ASSETS / 'bad.jsonl'}]"])
    with pytest.raises(Exception) as err:
        run_prepare(cfg)
    assert f"{ASSETS / 'bad.jsonl'}:3: invalid JSON" in str(err.value)


def test_missing_inputs_are_named(ray_cluster, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tmp_path), f"data.paths=[{tmp_path / 'nope' / '*.jsonl'}]"])
    with pytest.raises(DataError, match=r"nothing matches .*nope/\*\.jsonl"):
        run_prepare(cfg)
