"""The `registry` and `serve` sections: the eval gate, and how a model is served."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylm.config.base import Section


class GateSection(Section):
    """The eval gate that decides whether a newly registered version becomes `<name>:best`. Every enabled check
    must pass; a version that fails is still registered (and `latest`), only not promoted."""

    max_val_ppl: float | None = Field(None, gt=0)
    """Promote only under this validation perplexity (unset: no threshold)."""
    compare_to_best: bool = True
    """Promote only when better than the current `best` on the same validation data (the first model passes)."""


class RegistrySection(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The name models of this run are registered under; default: `run.name`."""
    gate: GateSection = GateSection()


class AutoscalingSection(Section):
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


class ServeSection(Section):
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
