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
_SECRET_PARAM_WORDS = _SECRET_WORDS | {"key", "sig", "signature", "auth", "authorization", "pass"}
_NOT_SECRET_FIELDS = frozenset({"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token"})
_QUERY_PARAM = re.compile(r"([?&;])([^=&#;?]+)=([^&#;]*)")


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def secret_field(name: str) -> bool:
    lowered = name.lower()
    if lowered in _NOT_SECRET_FIELDS or lowered.endswith(("_file", "_path", "_env")):
        return False
    return bool(_words(lowered) & _SECRET_WORDS) or any(k in lowered for k in ("api_key", "access_key", "secret_key"))


def redact_uri(text: str) -> str:
    """A URI without its secrets: `https://user:pw@host` -> `https://user:***@host`, `https://TOKEN@host` ->
    `https://***@host` (a user name alone is how tokens travel: GitHub's, a proxy's), and the values of query and
    fragment parameters that look secret (`s3://bucket?access_key=..&secret_key=..`, signed URLs, `?pass=`,
    `#access_token=`) replaced by `***`."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        authority = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    tail, hash_sign, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    return f"{scheme}://{authority}{path}{question}{_redact_params(query)}{hash_sign}{_redact_params(fragment)}"


def _redact_params(params: str) -> str:
    if not params:
        return params
    return _QUERY_PARAM.sub(
        lambda m: f"{m[1]}{m[2]}={REDACTED}" if _words(m[2]) & _SECRET_PARAM_WORDS else m[0], "?" + params
    )[1:]


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")


def redact_text(text: str) -> str:
    """A message (an error, a warning) with every URI in it redacted: what raylm prints may echo a path."""
    return _URI.sub(lambda m: redact_uri(m[0]), text)


def redact(value: Any) -> Any:
    """A JSON-able value with secrets replaced by `***`: values of fields whose names look secret, and passwords
    and secret query parameters in URIs. For everything raylm writes to disk; never for what crosses into Ray
    workers, which need the real values."""
    if isinstance(value, dict):
        return {
            key: REDACTED if item is not None and secret_field(str(key)) else redact(item)
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
