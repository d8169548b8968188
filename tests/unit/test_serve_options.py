"""The serve stage's options without Ray: bind safety, Serve's deployment options from `serve.*`, chat prompts."""

import logging

import pytest

from raylm.config import ConfigError, load_config
from raylm.data.tokenizer import train_bpe
from raylm.serving.access import check_bind, replica_key_hash
from raylm.serving.chat import DEFAULT_STOP, render_chat
from raylm.serving.server import ServeConfigError, app_options, deployment_options, http_options, local_url


def test_a_public_bind_needs_an_api_key(monkeypatch, tmp_path, caplog):
    """The rule the replica applies on every path, to the host Serve's proxy really binds."""
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    with pytest.raises(ServeConfigError, match=r"http_options.host=0.0.0.0 would expose the model .* RAYLM_API_KEY"):
        replica_key_hash(None, None, "0.0.0.0", {})
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-a-file\n")
    from_file = replica_key_hash(None, str(key_file), "0.0.0.0", {})
    options = app_options(load_config(None, ["serve.host=0.0.0.0", f"serve.api_key_file={key_file}"]), threads=1)
    assert options["api_key_sha256"] == from_file and "sk-from-a-file" not in str(options)  # only the hash travels
    assert replica_key_hash(from_file, None, "0.0.0.0", {}) == from_file  # the builder's hash, passed on
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert replica_key_hash(None, None, "127.0.0.1", {}) is None  # loopback: no key needed, but said loudly
    assert "NO API KEY" in caplog.text
    # The same key from the environment with a stray newline (a .env file, a paste) is the same key: same hash.
    monkeypatch.setenv("RAYLM_API_KEY", "sk-from-a-file\n")
    assert replica_key_hash(None, None, "::", {}) == from_file
    assert app_options(load_config(None, ["serve.host=0.0.0.0"]), threads=1)["api_key_sha256"] == from_file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        replica_key_hash(None, None, "0.0.0.0", {"RAYLM_API_KEY": "sk-from-a-file"})  # serve/config.yaml's env_vars
    assert "serve.api_key_file" in caplog.text and "dashboard" in caplog.text and "sk-from-a-file" not in caplog.text
    monkeypatch.setenv("RAYLM_API_KEY", " \n")  # blank is no key: the public bind is still refused
    with pytest.raises(ServeConfigError):
        replica_key_hash(None, None, "10.1.2.3", {})
    with pytest.raises(ServeConfigError, match=r"serve\.host"):
        check_bind("0.0.0.0", False, "serve.host")


def test_serve_fields_become_serves_deployment_and_http_options():
    cfg = load_config(None, ["serve.max_batch_size=4", "serve.max_queued_requests=10", "serve.retry_after_s=2"])
    options = deployment_options(cfg.serve)
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 8  # two batches' worth by default
    assert options["max_queued_requests"] == 10
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 2.0}
    scaled = deployment_options(load_config(None, ["serve.autoscaling={min_replicas: 1, max_replicas: 3}"]).serve)
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    assert http_options(cfg.serve) == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 60.0}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("serve.max_ongoing_requests=2", "no batch could ever fill"),
        ("serve.autoscaling={min_replicas: 3, max_replicas: 2}", "min_replicas"),
        ("serve.quantize=int4", "serve.quantize"),
        ("serve.max_queued_requests=0", "serve.max_queued_requests"),
    ],
)
def test_impossible_serve_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["serve.max_batch_size=4", override])


def test_chat_without_a_template_uses_the_documented_default():
    tokenizer = train_bpe(["user: hello\nassistant: hi\n"] * 20, vocab_size=280)
    text, stops = render_chat(tokenizer, [("system", "Be brief."), ("user", "Hello?")])
    assert text == "system: Be brief.\nuser: Hello?\nassistant:" and stops == [DEFAULT_STOP]
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    text, stops = render_chat(tokenizer, [("user", "Hello?")])
    assert text == "<user>Hello?<assistant>" and stops == []


def test_the_servers_local_url_for_each_kind_of_bind():
    assert local_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert local_url("0.0.0.0", 8000) == local_url("::", 8000) == "http://127.0.0.1:8000"
    assert local_url("::1", 8000) == "http://[::1]:8000"  # httpx refuses http://::1:8000
    assert local_url("localhost", 9) == "http://localhost:9"
