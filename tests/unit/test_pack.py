import numpy as np
import pyarrow as pa

from raylm.data.pack import BlockCarry, TokenizePack, pack_documents
from raylm.data.sources import BAD, OK, split_of
from raylm.data.tokenizer import EOS_TOKEN, train_bpe


def test_pack_documents_appends_eos_and_cuts_exact_blocks():
    blocks, tail = pack_documents([[1, 2, 3], [4, 5], [6]], eos_id=0, block_len=4)
    # stream: 1 2 3 0 4 5 0 6 0  -> two blocks of 4, one token left over
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert tail.tolist() == [0]


def test_pack_documents_of_nothing():
    blocks, tail = pack_documents([], eos_id=0, block_len=4)
    assert blocks.shape == (0, 4) and tail.size == 0


def test_block_carry_joins_leftovers_in_order():
    carry = BlockCarry(block_len=3)
    assert carry.add(np.array([1, 2])).shape == (0, 3)
    assert carry.add(np.array([3, 4, 5, 6, 7])).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert carry.remainder == 1


def test_tokenize_pack_counts_every_token(tmp_path):
    texts = ["the cat sat on the mat", "  ", "a dog ran far away", "the end", "x", None]
    tokenizer = train_bpe([t for t in texts if t] * 20, vocab_size=300)
    tokenizer.save_pretrained(str(tmp_path))
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    splits = {t: split_of(t, seed=0, val_fraction=0.5) for t in texts if t is not None}
    packer = TokenizePack((tmp_path / "tokenizer.json").read_text(), eos_id=eos, seq_len=3, seed=0, val_fraction=0.5)
    batch = pa.table({"text": pa.array(texts, pa.large_string()), "status": pa.array([OK] * 5 + [BAD], pa.int8())})
    out = packer(batch).to_pydict()

    for split in ("train", "val"):
        docs = [t for t in texts if t is not None and t.strip() and splits[t] == split]
        expected = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
        rows = [i for i, s in enumerate(out["split"]) if s == split]
        tail = [i for i in rows if out["is_tail"][i]]
        assert len(tail) == 1 and tail[0] == rows[-1], "one tail row, last for its split"
        assert sum(len(out["input_ids"][i]) for i in rows) == expected
        assert all(len(out["input_ids"][i]) == 4 for i in rows if i not in tail)
        assert out["n_tokens"][tail[0]] == expected
        tail_row = tail[0]
        assert out["n_docs"][tail_row] == len(docs)
        assert out["n_empty"][tail_row] == sum(
            1 for t in texts if t is not None and not t.strip() and splits[t] == split
        )
    assert sum(out["n_bad"]) == 1


def test_shards_are_uint16_when_the_vocabulary_fits_else_uint32(tmp_path):
    import pyarrow.parquet as pq

    from raylm.data.shards import ShardWriter, token_dtype
    from raylm.storage import Location

    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    writer = ShardWriter(Location.parse(tmp_path), block_len=3, dtype=token_dtype(100_000), rows_per_shard=2)
    writer.add(np.array([[1, 2, 99_999], [4, 5, 6], [7, 8, 9]]))
    assert writer.close() == [{"file": "part-00000.parquet", "rows": 2}, {"file": "part-00001.parquet", "rows": 1}]
    column = pq.read_table(tmp_path / "part-00000.parquet").column("input_ids")
    assert column.type.value_type == pa.uint32() and column.type.list_size == 3
    assert column.to_pylist() == [[1, 2, 99_999], [4, 5, 6]]
