"""Secrets never reach disk: what raylm writes (stage markers, registry manifests, MLflow params) goes through
`redact` or `public_config` first. What crosses into Ray workers is never redacted: they need the real values."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raylm.config import Config

REDACTED = "***"
# Words that make a config field (or a URI query parameter) a secret. A tokenizer's special tokens are not secrets,
# and fields that say where a secret is kept (`serve.api_key_file`) are not the secret itself.
_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "pwd", "apikey", "credential", "credentials"})
_SECRET_PARAM_WORDS = _SECRET_WORDS | {"key", "sig", "signature", "auth", "authorization"}
_NOT_SECRET_FIELDS = frozenset({"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token"})
_QUERY_PARAM = re.compile(r"([?&;])([^=&#;?]+)=([^&#;]*)")


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def _secret_field(name: str) -> bool:
    lowered = name.lower()
    if lowered in _NOT_SECRET_FIELDS or lowered.endswith(("_file", "_path", "_env")):
        return False
    return bool(_words(lowered) & _SECRET_WORDS) or any(k in lowered for k in ("api_key", "access_key", "secret_key"))


def redact_uri(text: str) -> str:
    """A URI without its secrets: `https://user:pw@host` -> `https://user:***@host`, and the values of query
    parameters that look secret (`s3://bucket?access_key=..&secret_key=..`, signed URLs) replaced by `***`."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    path, question, query = tail.partition("?")
    if question:
        query = _QUERY_PARAM.sub(
            lambda m: f"{m[1]}{m[2]}={REDACTED}" if _words(m[2]) & _SECRET_PARAM_WORDS else m[0], "?" + query
        )[1:]
    return f"{scheme}://{authority}{path}{question}{query}"


def redact(value: Any) -> Any:
    """A JSON-able value with secrets replaced by `***`: values of fields whose names look secret, and passwords
    and secret query parameters in URIs. For everything raylm writes to disk; never for what crosses into Ray
    workers, which need the real values."""
    if isinstance(value, dict):
        return {
            key: REDACTED if item is not None and _secret_field(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value


def public_config(cfg: Config) -> dict[str, Any]:
    """The config as written to disk (stage markers, registry manifests): the JSON dump with secrets redacted."""
    return redact(cfg.model_dump(mode="json"))
