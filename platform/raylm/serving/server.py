"""The serve stage on the driver: resolve the model, check the bind is safe, deploy, wait until it answers."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.cluster import ResourcePlan
from raylm.config import Config, ServeSection
from raylm.registry import resolve, version_aliases
from raylm.runs import RunPaths

APP_NAME = "raylm"
API_KEY_ENV = "RAYLM_API_KEY"


class ServeConfigError(ValueError):
    """Serving was asked for something unsafe or impossible (a public bind without an API key, ...)."""


@dataclass(frozen=True)
class ServedModel:
    path: Path
    name: str
    aliases: list[str]
    version: int | None


def resolve_model(cfg: Config) -> ServedModel:
    """`serve.model` as a model directory, or a registry reference (default: `<model name>:latest`). A version in a
    remote registry is downloaded once to a local cache (`~/.cache/raylm/models/`), keyed by its weights' hash."""
    ref = cfg.serve.model or f"{cfg.model_name}:latest"
    if Path(ref).expanduser().is_dir():
        path = Path(ref).expanduser().resolve()
        return ServedModel(path, path.name, [], None)
    registry = RunPaths.of(cfg).registry
    found = resolve(registry, ref)
    # The names requests may use: the version, and the aliases that point at it now (`name:latest`, `name:best`).
    aliases = [*version_aliases(registry, found.name, found.version), found.ref]
    if found.path.is_local:
        return ServedModel(found.path.local, found.name, aliases, found.version)
    cache = Path(os.environ.get("RAYLM_CACHE", "~/.cache/raylm")).expanduser() / "models"
    local = cache / f"{found.name}-{found.version}-{found.manifest['weights_sha256'][:12]}"
    if not local.is_dir():
        partial = found.path.download(local.with_name(f".{local.name}.{os.getpid()}.partial"))
        partial.rename(local)  # complete or absent, even if two servers start at once
    return ServedModel(local, found.name, aliases, found.version)


def api_key(section: ServeSection) -> str | None:
    """The serving API key from `RAYLM_API_KEY` or `serve.api_key_file`; never from the config itself."""
    key = os.environ.get(API_KEY_ENV)
    if not key and section.api_key_file:
        try:
            key = Path(section.api_key_file).expanduser().read_text().strip()
        except OSError as err:
            raise ServeConfigError(f"serve.api_key_file: cannot read {section.api_key_file}: {err.strerror}") from None
    return key or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_options(cfg: Config, threads: int) -> dict[str, Any]:
    key = api_key(cfg.serve)
    if key is None and not is_loopback(cfg.serve.host):
        raise ServeConfigError(
            f"serve.host={cfg.serve.host} would expose the model beyond this machine without an API key: "
            f"set {API_KEY_ENV} or serve.api_key_file"
        )
    return {
        "threads": threads,
        "max_batch_size": cfg.serve.max_batch_size,
        "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
        "max_tokens_limit": cfg.serve.max_tokens_limit,
        "api_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
    }


def start_serving(cfg: Config, plan: ResourcePlan, timeout_s: float = 120) -> dict[str, Any]:
    """Deploy the model and return once `/healthz` answers. The app runs until `stop_serving` (or the cluster) ends."""
    from ray import serve

    from raylm.cluster import quiet_logger
    from raylm.serving.app import build_app

    quiet_logger("ray.serve")
    model = resolve_model(cfg)
    options = app_options(cfg, plan.cpus_per_worker)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    _check_http_options(cfg.serve)
    app = build_app(str(model.path), model.name, model.aliases, options, cfg.serve.num_replicas)
    serve.run(app, name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    url = f"http://{host}:{cfg.serve.port}"
    wait_until_healthy(url, timeout_s)
    return {
        "stage": "serve",
        "url": url,
        "openai_base_url": f"{url}/v1",
        "model": model.name,
        "version": model.version,
        "model_dir": str(model.path),
        "api_key_required": options["api_key_sha256"] is not None,
    }


def _check_http_options(section: ServeSection) -> None:
    """Serve's HTTP proxy is configured once per cluster; `serve.start` ignores different options afterwards."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (section.host, section.port):
        raise ServeConfigError(
            f"Ray Serve already listens on {running.host}:{running.port} in this cluster and cannot move to "
            f"serve.host={section.host}, serve.port={section.port}: use those, or `serve shutdown` first"
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
