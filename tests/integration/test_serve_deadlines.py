"""serve: a request's deadline, a disconnect and the token budget, over real HTTP on 127.0.0.1, with a model slow
enough to watch (GPT-2 small's shape, untrained: ~20 ms a token on 2 cores). The replica's deadline answers 408
with an OpenAI error object before Serve's proxy would, a stream past it ends with an error event, a disconnected
stream stops, and in each case the row stops decoding (the next request is answered at once); the token budget
refuses what would overrun it with a 503 and Retry-After, and takes it once the budget is given back."""

import json
import threading
import time

import httpx
import pytest

from raylm.cluster import plan_resources
from raylm.config import validate_config
from raylm.serving.server import start_serving, stop_serving
from tests.conftest import register_untrained_model
from tests.integration.test_serve_limits import _completion

pytestmark = pytest.mark.timeout(300)


def _shutdown_serve() -> None:
    from ray import serve

    serve.shutdown()


SLOW_CONTEXT = 1024
DEADLINE = 4.0


@pytest.fixture(scope="module")
def slow(prepared, serve_port, tmp_path_factory):
    """GPT-2 small's shape, untrained (~20 ms a token on 2 cores): a long reply takes long enough to watch."""
    _shutdown_serve()  # Serve's proxy takes its timeout once: this module's, then nothing left behind
    base, data = prepared
    tree = base.model_dump(mode="json")
    tree["run"]["dir"] = str(tmp_path_factory.mktemp("slow"))
    tree["data"]["seq_len"] = SLOW_CONTEXT
    tree["model"]["preset"] = "gpt2-small"
    tree["registry"] = {"name": "slow"}
    tree["serve"] = {
        "port": serve_port,
        "request_timeout_s": DEADLINE,
        "max_tokens_limit": SLOW_CONTEXT,
        "token_budget": 1500,
        "max_batch_size": 4,
    }
    cfg = validate_config(tree)
    register_untrained_model(cfg, data, "slow")
    summary = start_serving(cfg, plan_resources(cfg, embedded=True))
    client = httpx.Client(base_url=summary["url"], timeout=120)
    started = time.monotonic()
    assert _completion(client, "The", 40).status_code == 200
    per_token = (time.monotonic() - started) / 40
    assert per_token * 1000 > 3 * DEADLINE, f"{per_token * 1000:.1f} ms a token: too fast to see a row stop"
    yield client
    client.close()
    stop_serving()
    _shutdown_serve()


def _answered_at_once(client: httpx.Client) -> None:
    """The replica is free: a row left decoding (~20 s for 1000 tokens) would hold this one back."""
    started = time.monotonic()
    response = _completion(client, "The river", 2)
    assert response.status_code == 200 and time.monotonic() - started < DEADLINE, response.text


def test_a_reply_past_the_deadline_is_a_408_error_object_and_stops_decoding(slow):
    started = time.monotonic()
    response = _completion(slow, "The", 1000)
    assert response.status_code == 408, response.text
    assert time.monotonic() - started < DEADLINE  # the replica's answer, before the proxy's plain-text one
    error = response.json()["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout_error" and "fewer tokens" in error["message"]
    _answered_at_once(slow)


def test_a_stream_past_the_deadline_ends_with_an_error_event_and_stops_decoding(slow):
    body = {"prompt": "The", "max_tokens": 1000, "temperature": 0, "stream": True}
    with slow.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    assert json.loads(events[-2])["error"]["code"] == "timeout"
    assert all("choices" in json.loads(event) for event in events[:-2])
    _answered_at_once(slow)


def test_a_disconnected_stream_stops_decoding(slow):
    body = {"prompt": "The", "max_tokens": 1000, "temperature": 0, "stream": True}
    # A client of its own: leaving the block closes its connection mid-reply.
    with (
        httpx.Client(base_url=str(slow.base_url), timeout=60) as own,
        own.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert next(line for line in response.iter_lines() if line.startswith("data: "))
    time.sleep(0.5)
    _answered_at_once(slow)


def test_work_past_the_token_budget_is_a_503_with_retry_after(slow):
    """Budget 1500 tokens: a request of 1 prompt x 1000 tokens is in; another of 2 prompts x 300 would pass it."""
    long = threading.Thread(target=_completion, args=(slow, "The", 1000))
    long.start()
    time.sleep(1)
    refused = slow.post("/v1/completions", json={"prompt": ["The", "A river"], "max_tokens": 300})
    long.join()
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "overloaded" and "token budget" in error["message"]
    # Given back when the long one ended (here, at its deadline): the same request is admitted now.
    admitted = slow.post("/v1/completions", json={"prompt": ["The", "A river"], "max_tokens": 30})
    assert admitted.status_code == 200, admitted.text
    # A request larger than the whole budget is served when the replica is idle (it would never fit otherwise).
    alone = slow.post("/v1/completions", json={"prompt": ["The", "A", "B", "C"], "max_tokens": 400, "stream": True})
    assert alone.status_code == 200
