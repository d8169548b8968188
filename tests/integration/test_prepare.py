"""prepare with real Ray Data on the fixed test corpus: exact counts, every token in exactly one block, cache."""

import json
import pathlib
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
    data_dir = pathlib.Path(summary["data_dir"])
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
        info = manifest.split(split)
        blocks = read_split_blocks(data_dir, split)
        assert info.tokens == len(stream)
        assert blocks.shape == (info.blocks, block_len)
        assert info.blocks == len(stream) // block_len, "only the split's last partial block is dropped"
        assert info.blocks * block_len + info.dropped_tokens == len(stream)
        # Exactly once: the blocks hold a sub-multiset of the stream, missing only the dropped tokens.
        missing = Counter(stream) - Counter(blocks.reshape(-1).tolist())
        assert sum(missing.values()) == info.dropped_tokens
        assert not Counter(blocks.reshape(-1).tolist()) - Counter(stream)
    # Each split's blocks hold exactly its own documents' tokens, and a document's split is a function of its
    # text: train and validation share no document.
    assert manifest.val_blocks > 0 and manifest.train_blocks > 0
    for split in ("train", "val"):
        rows = manifest.shard_rows(split)
        assert all(r == cfg.data.rows_per_shard for r in rows[:-1]) and 0 < rows[-1] <= cfg.data.rows_per_shard
    assert manifest.dtype == "uint16"
    assert manifest.tokenizer.vocab_size == len(tokenizer)


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


def _prepare(tmp_path, *overrides: str, name: str = "t", restart: bool = False) -> dict:
    return run_prepare(load_config(None, [*tiny_overrides(tmp_path, name), *overrides]), restart=restart)


def _jsonl(path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_compressed_json_lines_are_read(ray_cluster, tmp_path):
    import gzip

    packed = tmp_path / "corpus.jsonl.gz"
    packed.write_bytes(gzip.compress((ASSETS / "corpus.jsonl").read_bytes()))
    summary = _prepare(tmp_path, f"data.paths=[{packed}]")
    assert summary["documents"] == 238 and summary["empty_documents"] == 2


def test_parquet_column_and_missing_column(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _documents()
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), tmp_path / "c.parquet")
    summary = _prepare(
        tmp_path, f"data.paths=[{tmp_path / 'c.parquet'}]", "data.format=parquet", "data.text_field=body"
    )
    assert summary["documents"] == 238
    with pytest.raises(DataError, match=r"no column 'text' \(data\.text_field\); the columns are \['body', 'n'\]"):
        _prepare(tmp_path, f"data.paths=[{tmp_path / 'c.parquet'}]", "data.format=parquet", name="other")


def test_a_local_hugging_face_dataset_directory(ray_cluster, tmp_path):
    dataset_dir = tmp_path / "hf_dataset"
    dataset_dir.mkdir()
    _jsonl(dataset_dir / "train.jsonl", [d for d in _documents() if d.strip()])
    summary = _prepare(tmp_path, "data.paths=[]", "data.format=hf", f"data.hf.path={dataset_dir}")
    assert summary["documents"] == 238
    with pytest.raises(DataError, match=r"no column 'body'.*the columns are \['text'\]"):
        _prepare(
            tmp_path,
            "data.paths=[]",
            "data.format=hf",
            f"data.hf.path={dataset_dir}",
            "data.text_field=body",
            name="other",
        )


def test_bad_rows_skipped_and_counted_or_named(ray_cluster, tmp_path):
    paths = f"data.paths=[{ASSETS / 'corpus.jsonl'}, {ASSETS / 'bad.jsonl'}]"
    with pytest.raises(Exception, match=r"bad\.jsonl:3: invalid JSON"):
        _prepare(tmp_path, paths)
    summary = _prepare(tmp_path, paths, "data.skip_bad_rows=true", name="skip")
    assert summary["bad_rows"] == 1 and summary["documents"] == 238 + 3


def test_invalid_utf8_is_replaced_and_counted_or_refused(ray_cluster, tmp_path):
    corpus = (ASSETS / "corpus.jsonl").read_bytes().replace(b"The river", b"The riv\xe9r", 5)
    (tmp_path / "latin1.jsonl").write_bytes(corpus)
    paths = f"data.paths=[{tmp_path / 'latin1.jsonl'}]"
    summary = _prepare(tmp_path, paths)
    assert summary["documents"] == 238 and 1 <= summary["replaced_documents"] <= 5
    with pytest.raises(Exception, match=r"latin1\.jsonl:\d+: invalid UTF-8 at byte"):
        _prepare(tmp_path, paths, "data.on_decode_error=error", name="strict")


def test_empty_inputs_are_errors(ray_cluster, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty input file: .*empty\.txt"):
        _prepare(tmp_path, f"data.paths=[{tmp_path / 'empty.txt'}]", "data.format=text")
    blank = _jsonl(tmp_path / "blank.jsonl", ["", "   ", "\n"])
    with pytest.raises(Exception, match="the corpus holds no documents: 3 empty and 0 bad rows"):
        _prepare(tmp_path, f"data.paths=[{blank}]", name="blank")


def test_changed_inputs_rebuild_unchanged_inputs_hit(ray_cluster, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [d for d in _documents() if d.strip()])
    first = _prepare(tmp_path, f"data.paths=[{path}]")
    assert _prepare(tmp_path, f"data.paths=[{path}]")["cache"] == "hit"
    _jsonl(tmp_path / "c.jsonl", [d for d in _documents() if d.strip()][:200])
    rebuilt = _prepare(tmp_path, f"data.paths=[{path}]")
    assert rebuilt["cache"] == "miss" and rebuilt["documents"] == 200 < first["documents"]


def test_same_seed_same_shards(ray_cluster, tmp_path):
    import numpy as np

    first, second = (_prepare(tmp_path, name=name) for name in ("a", "b"))
    for split in ("train", "val"):
        a = read_split_blocks(pathlib.Path(first["data_dir"]), split)
        b = read_split_blocks(pathlib.Path(second["data_dir"]), split)
        assert np.array_equal(a, b)
    tokenizers = [read_manifest(pathlib.Path(s["data_dir"])).tokenizer.hash for s in (first, second)]
    assert tokenizers[0] == tokenizers[1]


def test_special_tokens_bos_and_a_five_megabyte_document(ray_cluster, tmp_path):
    from transformers import AutoTokenizer

    big = " ".join(_documents()[i % 240] for i in range(25_000))[: 5 << 20]
    path = _jsonl(tmp_path / "big.jsonl", [big, *[d for d in _documents() if d.strip()]])
    summary = _prepare(
        tmp_path,
        f"data.paths=[{path}]",
        "data.add_bos=true",
        "data.tokenizer.sample_bytes=200000",
        "data.tokenizer.bos_token=<s>",
        "data.tokenizer.eos_token=</s>",
        "data.tokenizer.pad_token=<pad>",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(pathlib.Path(summary["data_dir"]) / "tokenizer"))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    expected = sum(
        len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 2 for d in [big, *_documents()] if d.strip()
    )
    assert summary["tokens"] == expected
    assert summary["documents"] == 239


def test_a_local_tokenizer_directory_is_loaded_not_trained(prepared, tmp_path):
    _, first = prepared
    tokenizer_dir = pathlib.Path(first["data_dir"]) / "tokenizer"
    summary = _prepare(tmp_path, f"data.tokenizer.path={tokenizer_dir}")
    loaded = read_manifest(pathlib.Path(summary["data_dir"])).tokenizer
    assert loaded.source == str(tokenizer_dir)
    assert loaded.hash == read_manifest(pathlib.Path(first["data_dir"])).tokenizer.hash
    assert summary["tokens"] == first["tokens"]
