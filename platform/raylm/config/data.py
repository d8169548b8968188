"""The `run`, `data` and `model` sections: where runs live, what corpus and tokenizer, which model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylm.config.base import Section


class RunSection(Section):
    dir: str = "runs"
    """Root for shards, training runs, sweeps and the registry. A relative path is made absolute when the config is
    loaded: Ray workers and Tune trials run in other working directories."""
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)

    @field_validator("dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if "://" in value:
            return value
        return str(Path(value).expanduser().absolute())


class TokenizerSection(Section):
    path: str | None = None
    """A local Hugging Face tokenizer directory or hub id; unset means: train a byte-level BPE on the corpus."""
    vocab_size: int = Field(2048, ge=300, le=1_000_000)
    sample_bytes: int = Field(4_000_000, gt=0)
    """How much of the corpus the BPE is trained on."""
    bos_token: str = Field("<|endoftext|>", min_length=1)
    eos_token: str = Field("<|endoftext|>", min_length=1)
    pad_token: str = Field("<|pad|>", min_length=1)
    """Special tokens of a trained tokenizer (GPT-2 style by default: BOS and EOS are the same token)."""


class HFDatasetSection(Section):
    path: str
    """`datasets.load_dataset(path, ...)`: a local dataset directory, a builder such as `json`, or a hub id."""
    name: str | None = None
    split: str = "train"
    revision: str | None = None


class DataSection(Section):
    source: Literal["files", "stdlib", "hf"] | None = None
    """`files` reads `paths`; `stdlib` reads this Python's own standard-library sources (an offline demo corpus).
    Unset: `files` when `paths` are given, else `stdlib`."""
    paths: list[str] = Field(default_factory=list)
    format: Literal["text", "jsonl", "parquet", "hf"] = "text"
    """`jsonl` also reads `.json` files holding one array of records; `hf` reads `data.hf` with `datasets`."""
    text_field: str = "text"
    text_unit: Literal["file", "line"] = "line"
    """For `format: text`: a document per file or per line."""
    hf: HFDatasetSection | None = None
    skip_bad_rows: bool = False
    """Invalid JSON lines (or records without the text field) are skipped and counted instead of stopping."""
    on_decode_error: Literal["replace", "error"] = "replace"
    """Invalid UTF-8: replace the bytes (and count the documents) or stop with file:line."""
    add_bos: bool = False
    """Start every document with the BOS token (EOS always ends one)."""
    max_bytes: int | None = Field(None, gt=0)
    """Read whole files, in path order, until this many bytes (keeps demos quick)."""
    seq_len: int = Field(128, ge=8, le=32768)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    seed: int = 0
    rows_per_shard: int = Field(4096, ge=1)
    tokenizer: TokenizerSection = TokenizerSection()

    @model_validator(mode="after")
    def _paths_for_files(self) -> DataSection:
        if self.format == "hf":
            if self.hf is None:
                raise ValueError("data.format is hf: name the dataset in data.hf.path")
            if self.paths or self.source == "stdlib":
                raise ValueError("data.format is hf: data.paths and data.source do not apply")
            self.source = "hf"
            return self
        if self.source == "hf":
            raise ValueError("data.source is hf: set data.format: hf and data.hf.path")
        if self.source is None:
            self.source = "files" if self.paths else "stdlib"
        if self.source == "stdlib" and self.paths:
            raise ValueError("data.paths is set but data.source is stdlib: drop one of them")
        if self.source == "files" and not self.paths:
            raise ValueError("data.paths is empty: name the corpus files or globs (or set data.source: stdlib)")
        return self


class ModelSection(Section):
    preset: Literal["tiny", "gpt2-small", "llama-tiny"] = "tiny"
    pretrained: str | None = None
    """A local model directory or hub id to fine-tune; overrides `preset`."""
    trust_remote_code: bool = False
    vocab_multiple: int = Field(1, ge=1, le=1024)
    """Round a preset's embedding rows up to a multiple of this (64 or 128 on GPU: tensor cores run aligned
    shapes much faster, as nanoGPT's 50304 for GPT-2's 50257). The extra ids never occur in the data and serving
    never samples them."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout of a preset model (pretraining usually wants none: it also keeps runs with different worker counts
    numerically alike)."""
