"""A config from a YAML file and dotted overrides (`train.lr=3e-4`), with errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raylm.config.tree import Config, validate_config
from raylm.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(tree, item)
    return validate_config(tree)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = _place(data, err.start)
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at {where})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {err.problem}") from None
    except yaml.reader.ReaderError as err:  # a control character, which YAML does not allow
        where = _place(text, err.position)
        raise ConfigError(f"{path}: character U+{err.character:04X} at {where} is not allowed in YAML") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, data, train, ...)")
    return tree


def _place(text: str | bytes, offset: int) -> str:
    """`line L, column C` of a character offset."""
    before = text[:offset]
    newline = "\n" if isinstance(text, str) else b"\n"
    return f"line {before.count(newline) + 1}, column {offset - (before.rfind(newline) + 1) + 1}"


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[leaf] = _parse_value(raw)


def _parse_value(raw: str) -> Any:
    """Lists, mappings and null parse as YAML; scalars stay strings and pydantic converts them to the field's type
    (so `run.name=123` stays the string it should be, and `train.lr=3e-4` becomes a float)."""
    text = raw.strip()
    if text[:1] in "[{":
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse {raw!r}: {err}") from None
    if text.lower() in ("null", "none", "~"):
        return None
    return text
