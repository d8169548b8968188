"""Secrets never reach disk: what `public_config` and `redact` take out, and what they must leave alone."""

import pytest

from raylm.config import load_config
from raylm.digests import fingerprint
from raylm.redact import public_config, redact, redact_uri
from raylm.runs import stage_config


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://u:hunter2@mlflow.example:5000/x", "https://u:***@mlflow.example:5000/x"),
        ("https://u:p@ss@host/path", "https://u:***@host/path"),  # an unescaped @ in the password
        ("postgresql://admin:pw@db/mlflow?sslmode=require", "postgresql://admin:***@db/mlflow?sslmode=require"),
        (
            "s3://bucket/runs?access_key=AKID&secret_key=SECRET&session_token=TOK&region=us-east-1",
            "s3://bucket/runs?access_key=***&secret_key=***&session_token=***&region=us-east-1",
        ),
        (
            "https://acct.blob.example/c?sv=2024&sig=abc%2Fdef&X-Amz-Credential=AK&X-Amz-Security-Token=T",
            "https://acct.blob.example/c?sv=2024&sig=***&X-Amz-Credential=***&X-Amz-Security-Token=***",
        ),
        ("https://ghp_TOKEN123@github.com/org/repo", "https://***@github.com/org/repo"),  # a token as user name
        ("https://host/a?page=2&pass=hunter2", "https://host/a?page=2&pass=***"),
        ("https://host/cb#access_token=TOK&state=x", "https://host/cb#access_token=***&state=x"),
        ("https://host/a?page=2#section", "https://host/a?page=2#section"),
        ("gs://bucket/runs", "gs://bucket/runs"),
        ("/local/path?key=not-a-uri", "/local/path?key=not-a-uri"),
    ],
)
def test_uris_lose_their_secrets_and_keep_the_rest(uri, expected):
    assert redact_uri(uri) == expected


def test_messages_lose_the_secrets_of_every_uri_they_echo():
    from raylm.redact import redact_text

    message = "cannot read 'https://ghp_T0K@github.com/x.jsonl' nor s3://b/k?secret_key=S3CR3T (no such file)"
    assert redact_text(message) == (
        "cannot read 'https://***@github.com/x.jsonl' nor s3://b/k?secret_key=*** (no such file)"
    )


def test_secret_fields_are_redacted_special_tokens_and_key_files_are_not():
    tree = {
        "hf_token": "hf_abc",
        "password": "pw",
        "aws_secret_access_key": "s",
        "api_key": "k",
        "nested": [{"access_token": "t", "tokens_seen": 5, "val_tokens": 9}],
        "unset_token": None,
        "api_key_file": "/etc/raylm/key",
        "tokenizer": {"bos_token": "<|endoftext|>", "pad_token": "<|pad|>", "vocab_size": 300},
        "max_tokens_limit": 512,
    }
    assert redact(tree) == {
        "hf_token": "***",
        "password": "***",
        "aws_secret_access_key": "***",
        "api_key": "***",
        "nested": [{"access_token": "***", "tokens_seen": 5, "val_tokens": 9}],
        "unset_token": None,
        "api_key_file": "/etc/raylm/key",
        "tokenizer": {"bos_token": "<|endoftext|>", "pad_token": "<|pad|>", "vocab_size": 300},
        "max_tokens_limit": 512,
    }


def test_public_config_redacts_and_stage_hashes_ignore_a_rotated_password(tmp_path):
    base = [f"run.dir={tmp_path}", "run.name=r"]
    cfg = load_config(None, [*base, "train.mlflow_tracking_uri=https://u:first@mlflow.example"])
    rotated = load_config(None, [*base, "train.mlflow_tracking_uri=https://u:second@mlflow.example"])
    public = public_config(cfg)
    assert public["train"]["mlflow_tracking_uri"] == "https://u:***@mlflow.example"
    assert cfg.train.mlflow_tracking_uri == "https://u:first@mlflow.example"  # the config itself keeps it
    assert public["data"] == cfg.model_dump(mode="json")["data"]  # nothing else changes
    assert "first" not in str(stage_config(cfg, "train"))
    assert fingerprint(stage_config(cfg, "train")) == fingerprint(stage_config(rotated, "train"))
    moved = load_config(None, [*base, "train.mlflow_tracking_uri=https://u:first@other.example"])
    assert fingerprint(stage_config(cfg, "train")) != fingerprint(stage_config(moved, "train"))
