"""serve: a real Ray Serve deployment over real HTTP on 127.0.0.1, with an API key."""

import os

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
    tree["serve"] = {"port": serve_port, "max_batch_size": 4}
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
    ],
)
def test_client_mistakes_get_4xx_with_an_error_object(server, body, status, param):
    _, client, _ = server
    kwargs = (
        {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) else {"json": body}
    )
    response = client.post("/v1/completions", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in error["message"]


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
