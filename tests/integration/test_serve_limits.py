"""serve: no request can hurt another, over real HTTP on 127.0.0.1.

- Requests of every prompt length and `max_tokens` decoded together (GPT-2 and Llama presets), each filling the
  context exactly, give each the reply it gets alone (a finished row once pushed GPT-2 past its position table).
- A chat template that refuses a conversation is the client's 400 naming `messages`; `developer` is `system`.
- The cheap checks come first: a prompt certainly over the context is refused by its length, a stop string has a
  bound, a chat body over the size limit is a 413.
(Deadlines, disconnects and the token budget: test_serve_deadlines.py.)
"""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from raylm.cluster import plan_resources
from raylm.config import validate_config
from raylm.serving.server import start_serving, stop_serving
from tests.conftest import register_untrained_model

pytestmark = pytest.mark.timeout(300)

# Llama 2's rule, as real templates write it: roles must alternate, anything else is raise_exception.
ALTERNATING = (
    "{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{% else %}{% set offset = 0 %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role ' + m['role']) }}"
    "{% endif %}"
    "{% if m['role'] != 'system' and (m['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "the old miller walked down to the river and sat by the water until the sun went down over the hills"


@pytest.fixture(scope="module", params=["tiny", "llama-tiny"])
def mixed(request, prepared, serve_port, tmp_path_factory):
    """A tiny model of each family (context 32) whose tokenizer has a chat template that refuses some talks."""
    base, data = prepared
    tree = base.model_dump(mode="json")
    tree["run"]["dir"] = str(tmp_path_factory.mktemp("mixes"))
    tree["model"]["preset"] = request.param
    tree["registry"] = {"name": "mix"}
    tree["serve"] = {"port": serve_port, "max_batch_size": 16, "batch_wait_timeout_s": 0.3}
    cfg = validate_config(tree)
    register_untrained_model(cfg, data, "mix", chat_template=ALTERNATING)
    summary = start_serving(cfg, plan_resources(cfg, embedded=True))
    client = httpx.Client(base_url=summary["url"], timeout=120)
    yield client, cfg.data.seq_len
    client.close()
    stop_serving()


def _completion(client: httpx.Client, prompt: str, max_tokens: int) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_requests_of_every_length_decode_together_as_each_alone(mixed):
    client, context = mixed
    prompts = {}
    for words in (1, 2, 4, 8, 12, 16, 20):
        prompt = " ".join(WORDS.split()[:words])
        response = _completion(client, prompt, 1)
        if response.status_code == 200:  # else over the context
            prompts[prompt] = response.json()["usage"]["prompt_tokens"]
    assert max(prompts.values()) >= context - 8 and min(prompts.values()) <= 2, prompts
    # Each prompt twice: once with one new token, once filling the context exactly.
    asks = [(p, n) for p, tokens in prompts.items() for n in (1, context - tokens)]
    alone = [_completion(client, p, n).json()["choices"][0]["text"] for p, n in asks]
    for _ in range(2):
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(lambda ask: _completion(client, *ask), asks))
        assert [r.status_code for r in together] == [200] * len(asks), [r.text for r in together if r.status_code]
        assert [r.json()["choices"][0]["text"] for r in together] == alone


def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_them(mixed):
    client, _ = mixed
    talk = [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"}]
    refused = client.post("/v1/chat/completions", json={"messages": talk, "max_tokens": 2})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "messages" and "must alternate" in error["message"]
    # OpenAI's `developer` role is the template's `system`: accepted where `system` is.
    for role in ("system", "developer"):
        talk = [{"role": role, "content": "Be"}, {"role": "user", "content": "hi"}]
        response = client.post("/v1/chat/completions", json={"messages": talk, "max_tokens": 2, "temperature": 0})
        assert response.status_code == 200, (role, response.text)
    assert (
        response.json()["usage"]["prompt_tokens"]
        == client.post(
            "/v1/chat/completions", json={"messages": [{**talk[0], "role": "system"}, talk[1]], "max_tokens": 2}
        ).json()["usage"]["prompt_tokens"]
    )


def test_the_cheap_checks_come_first(mixed):
    client, context = mixed
    huge = "the river " * 100_000  # a megabyte of prompt: refused by its length, never tokenized
    response = client.post("/v1/completions", json={"prompt": huge[: (1 << 20) - 100], "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "characters, so at least" in error["message"]
    assert f"context of {context} tokens" in error["message"]
    many = client.post("/v1/completions", json={"prompt": ["fine", huge[:15_000]] * 32, "max_tokens": 4})
    assert many.status_code == 400 and "prompt 1 (15000 characters" in many.json()["error"]["message"]
    stop = client.post("/v1/completions", json={"prompt": "a", "stop": "x" * 513})
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop", stop.text
    stops = client.post("/v1/completions", json={"prompt": "a", "stop": ["\n", "x" * 513]})
    assert stops.status_code == 400 and stops.json()["error"]["param"] == "stop.1", stops.text
    assert client.post("/v1/completions", json={"prompt": "a", "stop": "x" * 512, "max_tokens": 2}).status_code == 200
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * (2 << 20)}]})
    assert chat.status_code == 413 and "limit" in chat.json()["error"]["message"]
