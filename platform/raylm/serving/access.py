"""Who may use the model server: the API key, where it comes from, and the one rule for public binds.

The rule, on every path (`raylm serve`, `serve run`, `serve deploy`): a server bound beyond loopback needs an API
key, and a server without one says so loudly in its log. The key comes from `RAYLM_API_KEY` or `serve.api_key_file`
in the environment of the process that builds the app (`raylm serve`, `serve run serve.app:app`), else in the
replica's own (the cluster's environment: under `serve deploy` the app is built on the cluster, so a key exported in
the deploying shell never reaches it). The replica applies the rule because only it runs on every path and can ask
Serve's controller which host the HTTP proxy really binds (`http_options.host`, which the app's builder never sees).
Only the key's SHA-256 crosses into the deployment's arguments, which Serve shows on its dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from raylm.errors import UsageError

API_KEY_ENV = "RAYLM_API_KEY"
logger = logging.getLogger("ray.serve")


class ServeConfigError(UsageError):
    """Serving was asked for something unsafe or impossible (a public bind without an API key, ...)."""


def read_api_key(key_file: str | None) -> str | None:
    """The key from `RAYLM_API_KEY`, else from `key_file`; None when neither holds one."""
    key = os.environ.get(API_KEY_ENV, "").strip()  # the key as typed: a stray newline would lock every client out
    if not key and key_file:
        try:
            key = Path(key_file).expanduser().read_text().strip()
        except OSError as err:
            raise ServeConfigError(f"serve.api_key_file: cannot read {key_file}: {err.strerror}") from None
    return key or None


def key_hash(key: str | None) -> str | None:
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_key: bool, setting: str) -> None:
    """Refuse a bind beyond loopback without an API key; `setting` names where the host was set."""
    if not has_key and not is_loopback(host):
        raise ServeConfigError(
            f"{setting}={host} would expose the model beyond this machine without an API key: set {API_KEY_ENV} "
            f"in the environment of the processes that serve it, or serve.api_key_file"
        )


def replica_key_hash(passed: str | None, key_file: str | None, bind_host: str, runtime_env_vars: dict) -> str | None:
    """The key hash a replica checks requests against: the one its builder passed, else its own environment's or
    `key_file`'s. Refuses a public `bind_host` without one; warns when there is none, and when the key sits in the
    runtime env's `env_vars` (Serve's dashboard shows them)."""
    digest = passed or key_hash(read_api_key(key_file))
    check_bind(bind_host, digest is not None, "Ray Serve's HTTP proxy binds http_options.host")
    if API_KEY_ENV in runtime_env_vars:
        logger.warning(
            "%s is set in the application's runtime_env env_vars, which Ray's dashboard shows to whoever reaches "
            "it: put the key in a file on the cluster and name it in serve.api_key_file instead",
            API_KEY_ENV,
        )
    if digest is None:
        logger.warning(
            "NO API KEY: the model at %s answers anyone who reaches that port (set %s or serve.api_key_file)",
            bind_host,
            API_KEY_ENV,
        )
    return digest


def authorized(authorization: str, digest: str | None) -> bool:
    """Whether an `Authorization` header carries the key whose hash is `digest` (always, without a key)."""
    if digest is None:
        return True
    scheme, _, token = authorization.partition(" ")
    presented = hashlib.sha256(token.strip().encode()).hexdigest()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, digest)


def serve_http_options():
    """Serve's HTTP proxy settings as the controller holds them (host, port, request_timeout_s): what the proxy
    really does, whichever path deployed the app (`serve deploy` never shows them to the app's builder)."""
    from ray.serve.context import _get_global_client  # private: Ray is pinned (pyproject)

    return _get_global_client().http_config


def runtime_env_vars() -> dict[str, str]:
    import ray

    return dict((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {})
