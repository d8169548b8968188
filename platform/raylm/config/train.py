"""The `train` and `tune` sections: one training run, and a sweep over train fields."""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raylm.config.base import Section

DEFAULT_MAX_STEPS = 100


class TrainSection(Section):
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


class AshaSection(Section):
    grace_tokens: int | None = Field(None, gt=0)
    """Tokens every trial sees before ASHA may stop it; default: the budget / reduction_factor^2 (three rungs)."""
    reduction_factor: float = Field(3, gt=1)
    """At each rung ASHA keeps about 1/reduction_factor of the trials."""


class GridSection(Section):
    """No early stopping: every trial runs its whole budget (Tune's FIFO scheduler)."""


class SchedulerSection(Section):
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


class TuneSection(Section):
    enabled: bool = True
    """`raylm pipeline` sweeps when true and trains once with `train` when false."""
    space: dict[str, SearchSpec] = Field(default_factory=lambda: {"train.lr": {"loguniform": [1e-4, 1e-2]}})
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

    def asha_grace(self, budget_tokens: int) -> int | None:
        """Tokens every trial trains on before ASHA may stop it, for a budget of `budget_tokens` per trial (None
        for a grid): `grace_tokens`, or three rungs' worth by default. ValueError when it could never stop one."""
        asha = self.scheduler.asha
        if asha is None:
            return None
        grace = asha.grace_tokens or max(1, int(budget_tokens / asha.reduction_factor**2))
        if grace > budget_tokens:
            raise ValueError(
                f"tune.scheduler.asha.grace_tokens={grace} is more than the budget of {budget_tokens} tokens per "
                "trial (tune.budget_tokens): ASHA could never stop a trial"
            )
        return grace

    @model_validator(mode="after")
    def _grace_within_budget(self) -> TuneSection:
        if self.budget_tokens:  # else the budget comes from the train section and the shards: checked with them
            self.asha_grace(self.budget_tokens)
        return self
