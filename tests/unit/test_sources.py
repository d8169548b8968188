"""Reading files into document rows, without Ray: every line counted, errors name file and line."""

import io
import json

import pytest

from raylm.data.sources import BAD, OK, REPLACED, DataError, DocumentParser, _lines


def parse(content: bytes, fmt="jsonl", unit="line", skip=False, on_decode="replace", field="text"):
    parser = DocumentParser(fmt, unit, field, skip, on_decode)
    rows = [row for table in parser.rows(io.BytesIO(content), "f.jsonl") for row in table.to_pylist()]
    return [(row["text"], row["status"]) for row in rows]


def test_lines_keep_empty_lines_and_survive_chunk_boundaries():
    content = b"alpha\r\n\nbeta gamma\ndelta"
    assert list(_lines(io.BytesIO(content), chunk_bytes=3)) == [
        (1, b"alpha"),
        (2, b""),
        (3, b"beta gamma"),
        (4, b"delta"),
    ]


def test_text_per_line_counts_every_line_and_per_file_keeps_the_whole_file():
    content = b"one\n\n  \ntwo\n"
    assert parse(content, fmt="text") == [("one", OK), ("", OK), ("  ", OK), ("two", OK)]
    assert parse(content, fmt="text", unit="file") == [(content.decode(), OK)]


def test_jsonl_records_blank_lines_and_json_arrays():
    lines = b'{"text": "a"}\n\n{"text": "b", "id": 2}\n'
    assert parse(lines) == [("a", OK), ("b", OK)]
    array = json.dumps([{"text": "x"}, {"text": "y"}]).encode()
    assert parse(array) == [("x", OK), ("y", OK)]


def test_invalid_json_names_file_and_line_or_is_skipped_and_counted():
    content = b'{"text": "a"}\n{"text": "b",\n{"text": "c"}\n'
    with pytest.raises(DataError, match=r"^f\.jsonl:2: invalid JSON"):
        parse(content)
    assert parse(content, skip=True) == [("a", OK), (None, BAD), ("c", OK)]


def test_a_missing_field_lists_the_record_keys():
    with pytest.raises(
        DataError, match=r"f\.jsonl:1: no field 'text' \(data\.text_field\); the record has \['body', 'id'\]"
    ):
        parse(b'{"body": "a", "id": 1}\n')
    with pytest.raises(DataError, match="field 'text' is int, not a string"):
        parse(b'{"text": 3}\n')


def test_invalid_utf8_is_replaced_and_marked_or_an_error():
    content = b'{"text": "caf\xe9"}\n{"text": "ok"}\n'
    assert parse(content) == [("caf\ufffd", REPLACED), ("ok", OK)]
    with pytest.raises(DataError, match=r"f\.jsonl:1: invalid UTF-8 at byte 13"):
        parse(content, on_decode="error")


def test_a_long_line_is_one_document():
    big = "word " * 1_000_000  # 5 MB in one line
    (row,) = parse(json.dumps({"text": big}).encode() + b"\n")
    assert row == (big, OK)


def test_raylm_outputs_inside_the_corpus_directory_are_not_read(tmp_path):
    from raylm.config import load_config
    from raylm.data.sources import list_input_files
    from raylm.runs import RunPaths

    (tmp_path / "a.txt").write_text("hello\n")
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r", f"data.paths=[{tmp_path}]"])
    paths = RunPaths.of(cfg)
    (paths.data / "train").mkdir()
    (paths.data / "manifest.json").write_text("{}")
    (paths.registry / "m" / "1" / "config.json").write_text("{}")
    assert list_input_files(cfg.data, outputs=(paths.root, paths.registry)) == [str(tmp_path / "a.txt")]


def test_directories_globs_and_duplicates_expand_to_sorted_files(tmp_path):
    from raylm.config import load_config
    from raylm.data.sources import list_input_files

    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl", ".hidden.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    by_dir = load_config(None, [f"data.paths=[{tmp_path}]"]).data
    by_glob = load_config(None, [f"data.paths=['{tmp_path}/**/*.jsonl', '{tmp_path}/a.jsonl']"]).data
    expected = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "sub/c.jsonl")]
    assert list_input_files(by_dir) == expected
    assert sorted(list_input_files(by_glob)) == expected
