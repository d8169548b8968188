"""Typed configuration for every stage, loaded from YAML plus dotted overrides.

One tree, one file: `run`, `data`, `model`, `train`, `tune`, `registry`, `serve`. The YAML mirrors the tree and
`train.lr=3e-4` on the command line overrides a leaf. Unknown keys and wrong types raise `ConfigError`, whose
message names the key; the CLI turns it into exit code 2 before anything reaches a cluster.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSection(_Section):
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


class TokenizerSection(_Section):
    path: str | None = None
    """A local Hugging Face tokenizer directory or hub id; unset means: train a byte-level BPE on the corpus."""
    vocab_size: int = Field(2048, ge=300, le=1_000_000)
    sample_bytes: int = Field(4_000_000, gt=0)
    """How much of the corpus the BPE is trained on."""
    bos_token: str = Field("<|endoftext|>", min_length=1)
    eos_token: str = Field("<|endoftext|>", min_length=1)
    pad_token: str = Field("<|pad|>", min_length=1)
    """Special tokens of a trained tokenizer (GPT-2 style by default: BOS and EOS are the same token)."""


class HFDatasetSection(_Section):
    path: str
    """`datasets.load_dataset(path, ...)`: a local dataset directory, a builder such as `json`, or a hub id."""
    name: str | None = None
    split: str = "train"
    revision: str | None = None


class DataSection(_Section):
    source: Literal["files", "stdlib", "hf"] | None = None
    """`files` reads `paths`; `stdlib` reads this Python's own standard-library sources (an offline demo corpus).
    Unset: `files` when `paths` are given, else `stdlib`."""
    paths: list[str] = []
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


class ModelSection(_Section):
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


DEFAULT_MAX_STEPS = 100


class TrainSection(_Section):
    num_workers: int | tuple[int, int] = 1
    """Data-parallel workers: a count, or `[min, max]` for elastic training (Ray Train starts with what fits, at
    least `min`, and grows towards `max` as nodes join, resuming from the latest checkpoint)."""
    batch_size: int = Field(8, ge=1)
    """The global batch: sequences per optimizer step across all workers."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per forward pass on one worker; default: the whole per-worker share (no accumulation)."""
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps of the run (default 100); or set `epochs` instead."""
    epochs: float | None = Field(None, gt=0)
    """Train for this many passes over the training split instead (rounded up to whole steps)."""
    eval_every: int = Field(50, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the forward pass (weights and optimizer stay fp32): `auto` is bf16 on a GPU that has it
    and fp32 on CPU; `fp16` adds a gradient scaler."""
    compile: bool = False
    """`torch.compile` the model (worth it on GPU for long runs; compiling costs minutes up front)."""
    cpus_per_worker: int | None = Field(None, ge=1)
    """CPUs (and torch threads) per worker; default: planned from the machine on an embedded cluster, else 1."""
    gpus_per_worker: float = Field(0, ge=0)
    """GPUs per worker (1 for one GPU each; 0 trains on CPU)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """Where the workers go: PACK fills a node first; STRICT_SPREAD puts each worker on a node of its own."""
    max_failures: int = Field(2, ge=0)
    num_to_keep: int = Field(2, ge=2)
    """Checkpoints kept (best by validation loss); at least 2, so a corrupt latest one still leaves one to resume."""
    tensorboard: bool = True
    """TensorBoard event files (losses, lr, tokens/s, grad norm) under the run's `train/logs/`."""
    mlflow_tracking_uri: str | None = None
    """Also log metrics to MLflow at this tracking URI (needs the `mlflow` extra: `pip install raylm[mlflow]`)."""

    @field_validator("lr")
    @classmethod
    def _finite_lr(cls, lr: float) -> float:
        if not math.isfinite(lr):
            raise ValueError("must be a finite number")
        return lr

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ValueError("must be a worker count or [min, max]") from None
        if isinstance(value, list | tuple):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("must be a count or [min, max] of two integers")
            low, high = value
            if not 1 <= low <= high:
                raise ValueError(f"[min, max] needs 1 <= min <= max, got {list(value)}")
            return low if low == high else (low, high)
        return value

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainSection:
        if isinstance(self.num_workers, int) and not 1 <= self.num_workers <= 1024:
            raise ValueError(f"train.num_workers must be between 1 and 1024, got {self.num_workers}")
        for workers in self.worker_counts:
            if self.batch_size % workers:
                over = (
                    f"{workers} workers (train.num_workers={list(self.num_workers)} allows {workers})"
                    if self.elastic
                    else f"train.num_workers={workers}"
                )
                raise ValueError(f"train.batch_size={self.batch_size} does not split evenly over {over}")
            per_worker = self.batch_size // workers
            if self.micro_batch_size is not None and per_worker % self.micro_batch_size:
                raise ValueError(
                    f"with {workers} workers each worker's share of train.batch_size ({per_worker}) is not a "
                    f"multiple of train.micro_batch_size={self.micro_batch_size}"
                )
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give train.max_steps or train.epochs, not both")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def workers_label(self) -> str:
        """`2`, or `1-4` for an elastic range: how status lines name the worker count."""
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.num_workers)

    @property
    def worker_counts(self) -> range:
        return range(self.min_workers, self.max_workers + 1)

    def per_worker_batch(self, world_size: int | None = None) -> int:
        return self.batch_size // (world_size or self.max_workers)

    def micro_batch(self, world_size: int | None = None) -> int:
        return self.micro_batch_size or self.per_worker_batch(world_size)

    def grad_accum_steps(self, world_size: int | None = None) -> int:
        return self.per_worker_batch(world_size) // self.micro_batch(world_size)

    def total_steps(self, train_blocks: int) -> int:
        """Optimizer steps of the run: `max_steps`, or `epochs` passes over `train_blocks` sequences."""
        if self.epochs is None:
            return self.max_steps or DEFAULT_MAX_STEPS
        return max(1, math.ceil(self.epochs * train_blocks / self.batch_size))


SearchSpec = dict[Literal["loguniform", "uniform", "choice", "grid"], list[Any]]


class AshaSection(_Section):
    grace_tokens: int | None = Field(None, gt=0)
    """Tokens every trial sees before ASHA may stop it; default: the budget / reduction_factor^2 (three rungs)."""
    reduction_factor: float = Field(3, gt=1)
    """At each rung ASHA keeps about 1/reduction_factor of the trials."""


class GridSection(_Section):
    """No early stopping: every trial runs its whole budget (Tune's FIFO scheduler)."""


class SchedulerSection(_Section):
    """Exactly one of `asha: {...}` or `grid: {}`; `tune.scheduler=grid` on the command line works too."""

    asha: AshaSection | None = None
    grid: GridSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = {"fifo": "grid"}.get(value, value)
            if name not in ("asha", "grid"):
                raise ValueError(f"unknown scheduler {value!r}: use asha or grid")
            return {name: {}}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SchedulerSection:
        if (self.asha is None) == (self.grid is None):
            raise ValueError("give exactly one of asha: {...} or grid: {}")
        return self

    @property
    def name(self) -> str:
        return "asha" if self.asha is not None else "grid"


BUDGETED_FIELDS = ("max_steps", "epochs", "eval_every")
"""Set per trial from `tune.budget_tokens` and `tune.eval_tokens` (in tokens, so batch sizes compare fairly)."""


class TuneSection(_Section):
    enabled: bool = True
    """`raylm pipeline` sweeps when true and trains once with `train` when false."""
    space: dict[str, SearchSpec] = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    num_samples: int = Field(4, ge=1)
    scheduler: SchedulerSection = SchedulerSection(asha=AshaSection())
    budget_tokens: int | None = Field(None, gt=0)
    """Training tokens per trial (trials are compared in tokens seen, not steps: a batch-size sweep gives trials
    different step counts). Default: what the `train` section alone would train on (steps x batch x seq_len)."""
    eval_tokens: int | None = Field(None, gt=0)
    """Validate (and report to Tune) every this many tokens; default: the ASHA grace (so every rung gets a fresh
    measurement), or a tenth of the budget for a grid."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Default: as many as the cluster's CPUs hold, given the workers each trial needs."""

    @field_validator("space")
    @classmethod
    def _valid_space(cls, space: dict[str, SearchSpec]) -> dict[str, SearchSpec]:
        checked: dict[str, SearchSpec] = {}
        for key, spec in space.items():
            section, _, leaf = key.partition(".")
            if section != "train" or leaf not in TrainSection.model_fields:
                close = difflib.get_close_matches(leaf, list(TrainSection.model_fields), n=1)
                hint = f" (did you mean 'train.{close[0]}'?)" if close else " (e.g. train.lr, train.batch_size)"
                raise ValueError(f"{key!r} is not a train field{hint}")
            if leaf in BUDGETED_FIELDS:
                raise ValueError(f"{key!r} cannot be swept: trials are budgeted by tune.budget_tokens")
            if len(spec) != 1:
                raise ValueError(f"{key}: give exactly one of loguniform, uniform, choice, grid")
            ((kind, values),) = spec.items()
            if kind in ("loguniform", "uniform"):
                try:
                    low, high = (float(v) for v in values)
                except (TypeError, ValueError):
                    raise ValueError(f"{key}.{kind}: needs [low, high], got {values!r}") from None
                if not low < high or (kind == "loguniform" and low <= 0):
                    raise ValueError(f"{key}.{kind}: needs 0 < low < high, got {values}")
                values = [low, high]
            elif not values:
                raise ValueError(f"{key}.{kind}: is empty")
            checked[key] = {kind: values}
        return checked

    @property
    def samples(self) -> int:
        """Draws of the space the sweep makes: `num_samples`, or one when every parameter is a grid: a second draw
        of an all-grid space would rerun every configuration with the same `train.seed` (on CPU, the same run to the
        last bit)."""
        return self.num_samples if any("grid" not in spec for spec in self.space.values()) else 1

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: `samples` draws of the space, each draw taking every value of each grid."""
        return self.samples * math.prod(len(spec["grid"]) for spec in self.space.values() if "grid" in spec)

    @model_validator(mode="after")
    def _grace_within_budget(self) -> TuneSection:
        asha = self.scheduler.asha
        if asha and asha.grace_tokens and self.budget_tokens and asha.grace_tokens > self.budget_tokens:
            raise ValueError(
                f"tune.scheduler.asha.grace_tokens={asha.grace_tokens} is more than tune.budget_tokens="
                f"{self.budget_tokens}: ASHA could never stop a trial"
            )
        return self


class GateSection(_Section):
    """The eval gate that decides whether a newly registered version becomes `<name>:best`. Every enabled check
    must pass; a version that fails is still registered (and `latest`), only not promoted."""

    max_val_ppl: float | None = Field(None, gt=0)
    """Promote only under this validation perplexity (unset: no threshold)."""
    compare_to_best: bool = True
    """Promote only when better than the current `best` on the same validation data (the first model passes)."""


class RegistrySection(_Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The name models of this run are registered under; default: `run.name`."""
    gate: GateSection = GateSection()


class AutoscalingSection(_Section):
    """Serve's autoscaling (`autoscaling_config`): replicas between min and max, aiming at this many requests in
    progress per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(60, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is over max_replicas ({self.max_replicas})")
        return self


class ServeSection(_Section):
    model: str | None = None
    """A registry reference (`name`, `name:latest`, `name:best`, `name:3`) or a model directory; default:
    `<model name>:latest`. A replica serving an alias (`name:best`) swaps in each newly promoted version."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSection | None = None
    """Set to autoscale between min_replicas and max_replicas instead of a fixed num_replicas."""
    threads: int | None = Field(None, ge=1)
    """Torch threads per replica (default: what a training worker would get on this cluster)."""
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_tokens_limit: int = Field(512, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Requests a replica works on at once (default: 2 x max_batch_size, so batches can fill)."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests waiting for a replica beyond those; more are refused at once with 503 and Retry-After."""
    retry_after_s: float = Field(1, ge=0)
    request_timeout_s: float = Field(60, gt=0)
    """A request not answered within this many seconds gets 408: Serve's `http_options.request_timeout_s`, and the
    replica's own deadline (a little earlier, with an OpenAI error object; it may be shorter than the proxy's)."""
    health_check_period_s: float = Field(10, gt=0)
    graceful_shutdown_timeout_s: float = Field(20, ge=0)
    """On shutdown or scale-down, requests in flight get this long to finish."""
    quantize: Literal["int8"] | None = None
    """`int8`: the model's linear layers in int8 (CPU serving)."""
    reload_interval_s: float = Field(5, ge=0)
    """How often a replica serving an alias checks it for a new version (0: never)."""
    api_key_file: str | None = None
    """A file holding the API key; `RAYLM_API_KEY` in the environment wins. Never the key itself."""
    token_budget: int | None = Field(None, ge=1)
    """Tokens (each prompt plus its max_tokens) a replica admits at once; a request that would pass it gets 503 with
    Retry-After, unless the replica is idle. Default: max_ongoing_requests x the model's context."""

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeSection:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is under max_batch_size "
                f"({self.max_batch_size}): no batch could ever fill"
            )
        return self

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class Config(_Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    tune: TuneSection = TuneSection()
    registry: RegistrySection = RegistrySection()
    serve: ServeSection = ServeSection()

    @model_validator(mode="after")
    def _tune_values_valid(self) -> Config:
        # Every value a sweep may try must be a valid train config (a batch size must split over the workers), or
        # a trial would die mid-sweep; kept as the field's type (YAML reads `3e-3` as a string).
        for key, spec in self.tune.space.items():
            ((kind, values),) = spec.items()
            if kind not in ("choice", "grid"):
                continue
            leaf = key.split(".", 1)[1]
            checked = []
            for value in values:
                try:
                    train = TrainSection.model_validate({**self.train.model_dump(), leaf: value})
                except ValidationError as err:
                    raise ValueError(f"tune.space.{key}: {value!r} is invalid: {_first_message(err)}") from None
                checked.append(getattr(train, leaf))
            spec[kind] = checked
        return self

    @property
    def model_name(self) -> str:
        return self.registry.name or self.run.name


def _first_message(err: ValidationError) -> str:
    return err.errors()[0]["msg"].removeprefix("Value error, ")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(tree, item)
    return validate_config(tree)


def validate_config(tree: dict[str, Any]) -> Config:
    """Validate a plain dict (from YAML, or crossing into a Ray worker) into a `Config`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


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


def _explain(err: ValidationError) -> str:
    lines = []
    for error in err.errors():
        loc = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_suggest(error['loc'])}")
        elif loc:
            got = error.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"{loc}: {error['msg'].removeprefix('Value error, ')}{shown}")
        else:
            lines.append(error["msg"].removeprefix("Value error, "))
    return "invalid config:\n  " + "\n  ".join(lines)


def _suggest(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    prefix = ".".join(str(part) for part in loc[:-1])
    return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""


def fingerprint(value: Any) -> str:
    """A stable short hash of a JSON-able value (config sections, manifests)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
