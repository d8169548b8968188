"""The serve stage on the driver: resolve the model, check the bind is safe, deploy, wait until it answers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from raylm.cluster import ResourcePlan, quiet_logger
from raylm.config import Config, ServeSection
from raylm.runs import RunPaths
from raylm.serving.access import API_KEY_ENV, ServeConfigError, check_bind, key_hash, read_api_key
from raylm.serving.app import build_app
from raylm.serving.source import ModelSource, resolve_source

APP_NAME = "raylm"
__all__ = ["API_KEY_ENV", "ServeConfigError"]


def model_source(cfg: Config) -> ModelSource:
    """`serve.model` as a model directory, or a registry reference (default: `<model name>:latest`)."""
    ref = cfg.serve.model or f"{cfg.model_name}:latest"
    if Path(ref).expanduser().is_dir():
        return ModelSource(path=str(Path(ref).expanduser().resolve()))
    # As a URI with its options (an S3 endpoint): the replica opens the registry from this text.
    return ModelSource(registry=RunPaths.of(cfg).registry.uri, ref=ref)


def api_key(section: ServeSection) -> str | None:
    """The serving API key from `RAYLM_API_KEY` or `serve.api_key_file`; never from the config itself."""
    return read_api_key(section.api_key_file)


def local_url(host: str, port: int) -> str:
    """Where this machine reaches the server: a wildcard bind through loopback, an IPv6 address in brackets."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def app_options(cfg: Config, threads: int) -> dict[str, Any]:
    """The replica's arguments: threads, batching and limits, quantization, and the API key's hash (never the key)
    when this process has one; the replica applies the public-bind rule to the host Serve really binds."""
    return {
        "threads": threads,
        "max_batch_size": cfg.serve.max_batch_size,
        "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
        "max_tokens_limit": cfg.serve.max_tokens_limit,
        "api_key_sha256": key_hash(api_key(cfg.serve)),
        "api_key_file": cfg.serve.api_key_file,
        "quantize": cfg.serve.quantize,
        "reload_interval_s": cfg.serve.reload_interval_s,
        "request_timeout_s": cfg.serve.request_timeout_s,
        "token_budget": cfg.serve.token_budget,
        "retry_after_s": cfg.serve.retry_after_s,
        "max_ongoing_requests": cfg.serve.ongoing_requests,
    }


def compose_app(cfg: Config, threads: int):
    """The Serve application for `cfg`: the model, the replica's options, Serve's deployment options. The one place it
    is put together, for `raylm serve` and for Serve's own tooling (`serve run serve.app:app`, `serve deploy`)."""
    return build_app(model_source(cfg), app_options(cfg, threads), deployment_options(cfg.serve))


def deployment_options(section: ServeSection, cpus_per_replica: float = 1) -> dict[str, Any]:
    """Serve's options for the deployment: replicas (or autoscaling), how many requests a replica takes and how
    many may wait (a finite queue: overload gets a fast 503 with Retry-After), health checks and shutdown."""
    scaling = (
        {"autoscaling_config": section.autoscaling.model_dump()}
        if section.autoscaling
        else {"num_replicas": section.num_replicas}
    )
    return {
        **scaling,
        "max_ongoing_requests": section.ongoing_requests,
        "max_queued_requests": section.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": section.retry_after_s},
        "health_check_period_s": section.health_check_period_s,
        "graceful_shutdown_timeout_s": section.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": cpus_per_replica},
    }


def http_options(section: ServeSection) -> dict[str, Any]:
    return {"host": section.host, "port": section.port, "request_timeout_s": section.request_timeout_s}


def start_serving(cfg: Config, plan: ResourcePlan, timeout_s: float = 120) -> dict[str, Any]:
    """Deploy the model and return once `/healthz` answers. The app runs until `stop_serving` (or the cluster) ends."""
    from ray import serve

    quiet_logger("ray.serve")
    source = model_source(cfg)
    model = resolve_source(source)  # fail here, with the registry's message, before deploying anything
    check_bind(cfg.serve.host, api_key(cfg.serve) is not None, "serve.host")  # before Serve binds anything
    serve.start(http_options=http_options(cfg.serve))
    _check_http_options(cfg.serve)
    serve.run(compose_app(cfg, cfg.serve.threads or plan.cpus_per_worker), name=APP_NAME, route_prefix="/")
    url = local_url(cfg.serve.host, cfg.serve.port)
    wait_until_healthy(url, timeout_s)
    return {
        "stage": "serve",
        "url": url,
        "openai_base_url": f"{url}/v1",
        "model": model.name,
        "version": model.version,
        "follows": source.ref if source.follows_alias and cfg.serve.reload_interval_s > 0 else None,
        "model_dir": str(model.path),
        "api_key_required": api_key(cfg.serve) is not None,
        "metrics_url": metrics_url(),
    }


def metrics_url() -> str | None:
    """Where this node's Prometheus metrics are (Ray's metrics agent: Serve's `ray_serve_*` and raylm's own)."""
    import ray

    node = ray._private.worker.global_worker.node  # Ray exposes the port only here
    port = getattr(node, "metrics_export_port", None)
    return f"http://{node.node_ip_address}:{port}/metrics" if port else None


def _check_http_options(section: ServeSection) -> None:
    """Serve's HTTP proxy is configured once per cluster; `serve.start` ignores different options afterwards. A
    shorter serve.request_timeout_s than the proxy's is kept by the replica (it answers 408 first)."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (section.host, section.port):
        raise ServeConfigError(
            f"Ray Serve already listens on {running.host}:{running.port} in this cluster and cannot move to "
            f"serve.host={section.host}, serve.port={section.port}: use those, or `serve shutdown` first"
        )
    proxy_timeout = running.request_timeout_s
    if proxy_timeout is not None and proxy_timeout > 0 and section.request_timeout_s > proxy_timeout:
        raise ServeConfigError(
            f"Ray Serve in this cluster already times requests out after {proxy_timeout}s, before "
            f"serve.request_timeout_s={section.request_timeout_s}: use at most that, or `serve shutdown` first"
        )


def wait_until_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the model server at {url} did not become healthy within {timeout_s:.0f}s")
        time.sleep(0.5)


def stop_serving() -> None:
    from ray import serve

    serve.delete(APP_NAME)


def complete(url: str, prompt: str, max_tokens: int, key: str | None = None, **sampling: Any) -> dict[str, Any]:
    """One completion request over HTTP, as any OpenAI client would send it."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens, **sampling},
        headers=headers,
        timeout=120,
    )
    if response.status_code != 200:
        raise RuntimeError(f"the model server answered {response.status_code}: {response.text[:500]}")
    return response.json()
