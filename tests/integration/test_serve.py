"""serve: a real Ray Serve deployment over real HTTP on 127.0.0.1, with an API key: OpenAI shapes (completions,
chat, streaming, models), the official `openai` client, batching, every client mistake as a 4xx."""

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from raylm.cluster import plan_resources
from raylm.config import validate_config
from raylm.serving.server import start_serving, stop_serving
from tests.conftest import free_port, register_untrained_model

pytestmark = pytest.mark.timeout(300)

KEY = "test-key-not-a-secret"


@pytest.fixture(scope="module")
def server(prepared, serve_port):
    base, data = prepared
    tree = base.model_dump(mode="json")
    tree["registry"] = {"name": "served"}
    tree["serve"] = {"port": serve_port, "max_batch_size": 4, "batch_wait_timeout_s": 0.05}
    cfg = validate_config(tree)
    register_untrained_model(cfg, data, "served")

    os.environ["RAYLM_API_KEY"] = KEY
    try:
        summary = start_serving(cfg, plan_resources(cfg, embedded=True))
    finally:
        del os.environ["RAYLM_API_KEY"]
    client = httpx.Client(base_url=summary["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    yield summary, client, cfg
    client.close()
    stop_serving()


def test_completion_has_the_openai_shape(server):
    summary, client, _cfg = server
    response = client.post("/v1/completions", json={"model": "served", "prompt": "The river", "max_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "served"
    (choice,) = body["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["completion_tokens"] <= 5 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert summary["api_key_required"] is True and summary["version"] == 1


def test_greedy_is_deterministic_and_aliases_work(server):
    _, client, _ = server
    request = {"prompt": "The old miller", "max_tokens": 6, "temperature": 0}
    first = client.post("/v1/completions", json={**request, "model": "served:latest"}).json()
    second = client.post("/v1/completions", json={**request, "model": "served:1"}).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_models_and_health(server):
    _, client, _ = server
    assert client.get("/healthz").json() == {"status": "ok", "model": "served"}
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert ids == {"served", "served:latest", "served:1"}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ("{not json", 400, None),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": 42}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"prompt": "a", "bogus": 1}, 400, "bogus"),
        ({"prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"prompt": "a", "model": "nope"}, 404, "model"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": ["a", ""]}, 400, "prompt.1"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "a", "n": 2}, 400, "n"),
        ({"prompt": "a", "stream": "yes"}, 400, "stream"),
        ({"prompt": "a", "logprobs": 2}, 400, "logprobs"),
        ([1, 2], 400, None),
        ("[" * 100_000, 400, None),  # nested too deep for the JSON parser, yet under the size limit
        ('{"prompt": "a", "seed": ' + "1" * 5000 + "}", 400, None),  # an integer past Python's digit limit
        ({"prompt": "a", "seed": 2**64}, 400, "seed"),
        ('{"prompt": "a\\ud800b"}', 400, "prompt"),  # a lone surrogate: no tokenizer can encode it
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ],
)
def test_client_mistakes_get_4xx_with_an_error_object(server, body, status, param):
    _, client, _ = server
    response = _post(client, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
        ("[", 400, None),
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages.0.content"),
    ],
)
def test_chat_mistakes_get_4xx_with_an_error_object(server, body, status, param):
    _, client, _ = server
    response = _post(client, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def _post(client: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, str):
        return client.post(path, content=body, headers={"Content-Type": "application/json"})
    return client.post(path, json=body)


def test_a_body_over_the_limit_is_413(server):
    _, client, _ = server
    response = client.post("/v1/completions", json={"prompt": "a" * (2 << 20)})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413_without_a_declared_length(server):
    _, client, _ = server
    chunks = iter([b'{"prompt": "', b"a" * (1 << 20), b"a" * (1 << 20), b'"}'])  # no Content-Length: chunked
    response = client.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_what_openai_clients_send_is_served(server):
    """Forms OpenAI accepts that a strict server could get wrong: nulls for defaults, a long stop string, an empty
    one, a temperature too small to divide by, the largest seed."""
    _, client, _ = server
    base = {"prompt": "The old miller", "max_tokens": 6}
    greedy = client.post("/v1/completions", json={**base, "temperature": 0}).json()["choices"][0]["text"]
    for extra in (
        {"temperature": None, "top_p": None, "seed": 1},
        {"stop": "\n\nHuman:", "temperature": 0},
        {"stop": "", "temperature": 0},
        {"temperature": 1e-40},
        {"seed": 2**64 - 1},
    ):
        response = client.post("/v1/completions", json={**base, **extra})
        assert response.status_code == 200, (extra, response.text)
        if "temperature" in extra and extra["temperature"] is not None and extra["temperature"] < 1e-5:
            assert response.json()["choices"][0]["text"] == greedy, extra
    defaulted = client.post("/v1/completions", json={"prompt": "The", "max_tokens": None, "temperature": 0}).json()
    finish, tokens = defaulted["choices"][0]["finish_reason"], defaulted["usage"]["completion_tokens"]
    assert (finish, tokens) == ("length", 16) or (finish == "stop" and tokens < 16)  # OpenAI's default max_tokens


def test_prompt_over_the_context_names_the_numbers(server):
    _, client, cfg = server
    response = client.post("/v1/completions", json={"prompt": "the river " * 40, "max_tokens": 8})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert f"context of {cfg.data.seq_len} tokens" in message and "max_tokens (8)" in message


def test_api_key_method_and_route_errors(server):
    summary, client, _cfg = server
    anonymous = httpx.post(f"{summary['url']}/v1/completions", json={"prompt": "a"}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{summary['url']}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/nowhere").status_code == 404


def test_the_official_openai_client_works_unmodified(server):
    from openai import OpenAI

    summary, _, _cfg = server
    client = OpenAI(base_url=summary["openai_base_url"], api_key=KEY, max_retries=0)
    completion = client.completions.create(model="served", prompt="The night train", max_tokens=4, temperature=0)
    assert completion.object == "text_completion" and isinstance(completion.choices[0].text, str)
    assert completion.usage.completion_tokens <= 4
    assert {model.id for model in client.models.list()} == {"served", "served:latest", "served:1"}


def test_a_second_port_on_the_same_cluster_is_refused(server):
    from raylm.serving.server import ServeConfigError

    _summary, _client, cfg = server
    other = validate_config({**cfg.model_dump(mode="json"), "serve": {"port": free_port()}})
    with pytest.raises(ServeConfigError, match=r"already listens on 127\.0\.0\.1"):
        start_serving(other, plan_resources(other, embedded=True))


def test_a_list_of_prompts_gets_one_choice_each(server):
    _, client, _ = server
    prompts = ["The river", "An old miller walked"]
    body = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    alone = [
        client.post("/v1/completions", json={"prompt": p, "max_tokens": 4, "temperature": 0}).json() for p in prompts
    ]
    assert [c["text"] for c in body["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)


def _events(response: httpx.Response) -> list[tuple[float, str]]:
    """(arrival time, data) of each server-sent event."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append((time.monotonic(), line[len("data: ") :]))
    return events


def test_streamed_completion_is_sse_ending_with_done_and_equals_the_plain_reply(server):
    _, client, cfg = server
    request = {"prompt": "The", "max_tokens": cfg.data.seq_len - 4, "temperature": 0}
    plain = client.post("/v1/completions", json=request).json()
    started = time.monotonic()
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    # Tokens arrive as they are generated: the chunks spread over the decoding steps. A server that sent the reply
    # once it was whole would deliver them in one burst (well under a millisecond apart); the last chunk cannot
    # arrive before the last token exists, so a first chunk that came >= 10 ms earlier came before it was generated.
    # (Comparing the first chunk with the whole stream's time flaked: the batch wait alone is 50 ms, and 28 steps
    # of the tiny model took 73 ms on CI.)
    first, last = events[0][0], events[-2][0]
    assert len(chunks) > 5 and last - first > 0.01, (first - started, last - started, len(chunks))


def test_chat_completion_and_its_stream(server):
    _, client, _ = server
    request = {"messages": [{"role": "user", "content": "The river"}], "max_tokens": 6}
    response = client.post("/v1/chat/completions", json={**request, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert "\nuser:" not in choice["message"]["content"]  # the default template's stop
    assert body["usage"]["completion_tokens"] <= 6
    stream = {**request, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream) as response:
        events = _events(response)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]


def test_the_openai_client_streams_and_chats(server):
    from openai import OpenAI

    summary, _, _cfg = server
    client = OpenAI(base_url=summary["openai_base_url"], api_key=KEY, max_retries=0)
    stream = client.completions.create(model="served", prompt="The night", max_tokens=5, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    plain = client.completions.create(model="served", prompt="The night", max_tokens=5, temperature=0)
    assert streamed == plain.choices[0].text
    chat = client.chat.completions.create(
        model="served:latest", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    pieces = client.chat.completions.create(
        model="served", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat.choices[0].message.content
    with pytest.raises(Exception) as caught:
        client.completions.create(model="served", prompt="x", max_tokens=2, top_p=3)
    assert getattr(caught.value, "status_code", None) == 400


def test_concurrent_requests_run_in_batches_larger_than_one(server):
    """raylm's histogram of the batches the model decoded (Ray's Prometheus endpoint) shows batches of more than one
    request."""
    summary, client, _ = server
    assert summary["metrics_url"]
    before = _batch_sizes(httpx.get(summary["metrics_url"], timeout=10).text)
    request = {"prompt": "The river", "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: client.post("/v1/completions", json=request), range(32)))
    assert {r.status_code for r in replies} == {200}
    assert len({r.json()["choices"][0]["text"] for r in replies}) == 1  # batched greedy = greedy
    # 32 requests in batches of at most 4: at least 8 batches, once Ray's metrics agent has exported them.
    deadline = time.monotonic() + 90
    while True:
        after = _batch_sizes(httpx.get(summary["metrics_url"], timeout=10).text)
        batches = after["count"] - before["count"]
        if batches >= 8 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert batches >= 8, (before, after)
    singles = after["le_1"] - before["le_1"]
    assert singles < batches, (before, after)  # some batch held more than one request


def _batch_sizes(metrics: str) -> dict[str, float]:
    """Count of batches, and of batches of size <= 1, from the `ray_raylm_decode_batch_size` histogram (zeros
    before the first export)."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        if not line.startswith("ray_raylm_decode_batch_size"):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("ray_raylm_decode_batch_size_count"):
            found["count"] = found.get("count", 0) + value
        elif re.search(r'le="1(\.0)?"', line):
            found["le_1"] = found.get("le_1", 0) + value
    return {"count": found.get("count", 0.0), "le_1": found.get("le_1", 0.0)}


def test_health_is_open_and_the_key_is_nowhere_in_rays_logs(server, ray_cluster):
    summary, client, _ = server
    assert httpx.get(f"{summary['url']}/healthz", timeout=30).status_code == 200  # no key needed
    client.post("/v1/completions", json={"prompt": "The", "max_tokens": 2})  # a request that carried the key
    from pathlib import Path

    logs = Path(ray_cluster._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    leaked = [p for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked
