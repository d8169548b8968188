"""serving.engine: the decoding thread merges the batches that wait for it, streams each request on its own, and
keeps going after a failure. A real tiny model decodes; the tests only hold the thread at chosen steps."""

import asyncio
import threading

import pytest

from raylm.serving.engine import DecodeEngine, Job
from raylm.serving.generate import GenerationRequest, generate_batch, generate_steps
from tests.unit.test_generate import _model_and_tokenizer

MODEL, TOKENIZER = _model_and_tokenizer()


def job(prompt: str, tokens: int, loaded: str = "model") -> Job:
    return Job(GenerationRequest(TOKENIZER(prompt, add_special_tokens=False)["input_ids"], tokens, 0), loaded)


def real_decode(jobs):
    return generate_steps(MODEL, TOKENIZER, [j.request for j in jobs])


async def collect(stream) -> tuple[str, str | None]:
    text, reason = "", None
    async for delta in stream:
        text, reason = text + delta.text, delta.finish_reason
    return text, reason


def alone(j: Job) -> str:
    return generate_batch(MODEL, TOKENIZER, [GenerationRequest(j.request.prompt_ids, j.request.max_new_tokens, 0)])[
        0
    ].text


def test_requests_that_arrive_while_the_model_is_busy_decode_together_in_its_next_batch():
    taken, busy = threading.Event(), threading.Event()

    def decode(jobs):
        taken.set()
        busy.wait(10)  # the first batch holds the model until the others have arrived
        return real_decode(jobs)

    sizes = []

    async def main():
        engine = DecodeEngine(8, decode, on_batch=sizes.append)
        first = engine.submit([job("def add(", 6)])
        await asyncio.to_thread(taken.wait, 10)
        later = [engine.submit([j])[0] for j in (job("class", 4), job("import os", 9))] + engine.submit(
            [job("print", 3)]
        )
        busy.set()
        return await asyncio.gather(collect(first[0]), *(collect(s) for s in later))

    replies = asyncio.run(main())
    assert sizes == [1, 3]
    prompts = [job("def add(", 6), job("class", 4), job("import os", 9), job("print", 3)]
    assert [text for text, _ in replies] == [alone(j) for j in prompts]  # greedy: batched as decoded alone
    assert all(reason in {"stop", "length"} for _, reason in replies)


def test_a_short_request_ends_with_its_last_token_not_with_its_batch():
    hold = threading.Event()

    def decode(jobs):
        for n, step in enumerate(real_decode(jobs)):
            if n == 3:
                hold.wait(10)  # the long row is still decoding
            yield step

    async def main():
        engine = DecodeEngine(8, decode)
        short, long = engine.submit([job("class", 2), job("def add(", 12)])
        text, reason = await asyncio.wait_for(collect(short), 5)
        hold.set()
        await collect(long)
        return text, reason

    text, reason = asyncio.run(main())
    assert text == alone(job("class", 2)) and reason is not None


def test_a_failing_batch_fails_its_requests_and_the_next_batch_runs():
    def decode(jobs):
        if jobs[0].loaded == "broken":
            raise RuntimeError("the model failed")
        return real_decode(jobs)

    async def main():
        engine = DecodeEngine(8, decode)
        (broken,) = engine.submit([job("class", 3, loaded="broken")])
        with pytest.raises(RuntimeError, match="the model failed"):
            await collect(broken)
        (fine,) = engine.submit([job("class", 3)])
        return await collect(fine)

    assert asyncio.run(main())[0] == alone(job("class", 3))


def test_two_models_never_share_a_batch_and_requests_nobody_waits_for_are_dropped():
    taken, busy, seen = threading.Event(), threading.Event(), []

    def decode(jobs):
        taken.set()
        busy.wait(10)
        seen.append([j.loaded for j in jobs])
        return real_decode(jobs)

    async def main():
        engine = DecodeEngine(8, decode)
        first = engine.submit([job("def", 2, "old")])
        await asyncio.to_thread(taken.wait, 10)
        mixed = engine.submit([job("class", 2, "old"), job("class", 2, "new"), job("print", 2, "old")])
        gone = job("import", 2, "old")
        (dropped,) = engine.submit([gone])
        gone.request.cancelled.set()  # its client left before its turn
        busy.set()
        await asyncio.gather(*(collect(s) for s in first + mixed))
        return await collect(dropped)

    assert asyncio.run(main()) == ("", None)
    assert seen == [["old"], ["old", "old"], ["new"]]


def test_a_failing_metric_does_not_stop_the_decoding_thread():
    def broken_metric(size):
        raise RuntimeError("metrics agent gone")

    async def main():
        engine = DecodeEngine(8, real_decode, on_batch=broken_metric)
        (stream,) = engine.submit([job("class", 3)])
        reply = await collect(stream)
        return engine, reply

    engine, reply = asyncio.run(main())
    assert reply[0] == alone(job("class", 3)) and engine.alive
