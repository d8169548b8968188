"""serving.admission and the token budget, without Ray: the cheap bounds are bounds (never refuse what fits), long
texts leave the event loop, the budget counts a request's prompts x max_tokens and gives each job back once."""

import asyncio
import threading
from types import SimpleNamespace

import pytest

from raylm.data.tokenizer import train_bpe
from raylm.serving.admission import INLINE_CHARS, check_fits, longest_token, off_the_loop, replica_deadline
from raylm.serving.chat import render_chat
from raylm.serving.engine import Job, TokenBudget
from raylm.serving.errors import ClientError
from raylm.serving.generate import GenerationRequest
from tests.unit.test_generate import TEXTS


def test_the_length_bound_never_refuses_a_text_that_fits():
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    loaded = SimpleNamespace(longest_token=longest_token(tokenizer), context=64)
    for text in ["def add(a, b):\n    return a + b\n" * n for n in (1, 2, 3)] + ["naïve café 日本語 " * 4]:
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens + 1 <= loaded.context:
            check_fits(text, loaded, 1, "prompt", "max_tokens")  # fits: never refused by the bound
        assert -(-len(text) // loaded.longest_token) <= tokens  # the bound is a lower bound on the real count
    with pytest.raises(ClientError, match=r"prompt \(6400 characters, so at least \d+ tokens\) plus max_tokens \(4\)"):
        check_fits("x" * 6400, loaded, 4, "prompt", "max_tokens")


def test_long_texts_are_tokenized_off_the_event_loop():
    async def where(size: int) -> str:
        return await off_the_loop(lambda: threading.current_thread().name, size)

    loop_thread = threading.current_thread().name
    assert asyncio.run(where(10)) == loop_thread
    assert asyncio.run(where(INLINE_CHARS + 1)) != loop_thread


def test_the_replicas_deadline_comes_before_the_proxys():
    assert replica_deadline(60, 60) == 58
    assert replica_deadline(4, 60) == pytest.approx(3.6)  # a shorter app timeout than the proxy's is kept
    assert replica_deadline(60, None) == 58 and replica_deadline(None, None) is None
    assert replica_deadline(60, -1) == 58  # a negative proxy timeout is "none" to Serve


def _job(prompt: int, max_tokens: int) -> Job:
    return Job(GenerationRequest(list(range(1, prompt + 1)), max_tokens), "model")


def test_the_token_budget_counts_prompts_and_max_tokens_and_gives_each_job_back_once():
    budget = TokenBudget(100)
    first = [_job(10, 40), _job(5, 5)]  # 60 tokens
    assert budget.take(first) and budget.used == 60
    assert not budget.take([_job(10, 31)]) and budget.used == 60  # 41 more would pass 100: refused, nothing held
    assert budget.take([_job(10, 30)]) and budget.used == 100
    first[0].end()
    first[0].end()  # the engine and the route both end a job: given back once
    assert budget.used == 50 and first[0].request.cancelled.is_set()
    for job in (*first, _job(1, 1)):
        budget.give(job)  # a job this budget no longer holds (or never held) changes nothing
    assert budget.used == 40


def test_an_idle_replica_takes_a_request_larger_than_its_budget():
    budget = TokenBudget(100)
    big = [_job(50, 100)]
    assert budget.take(big) and budget.used == 150
    assert not budget.take([_job(1, 1)])
    big[0].end()
    assert budget.used == 0


def test_a_chat_template_that_raises_is_the_clients_400_and_developer_is_system():
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user'] %}"
        "{{ raise_exception('Unknown role ' + m['role']) }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}<assistant>"
    )
    text, stops = render_chat(tokenizer, [("developer", "Be brief."), ("user", "Hi")])
    assert text == "<system>Be brief.<user>Hi<assistant>" and stops == []
    with pytest.raises(ClientError, match="chat template refuses these messages: Unknown role assistant") as caught:
        render_chat(tokenizer, [("user", "Hi"), ("assistant", "Hello")])
    assert caught.value.status == 400 and caught.value.param == "messages"
