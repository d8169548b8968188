"""A client's mistake names the parameter as the client wrote it, union member labels dropped (no Ray)."""

import pytest
from pydantic import ValidationError

from raylm.serving.errors import explain
from raylm.serving.schemas import ChatCompletionRequest, CompletionRequest


def _problem(kind, body):
    with pytest.raises(ValidationError) as caught:
        kind.model_validate(body)
    return explain(caught.value, body)


@pytest.mark.parametrize(
    ("kind", "body", "param", "code"),
    [
        (CompletionRequest, {"prompt": ["a", 3]}, "prompt.1", "invalid_value"),
        (CompletionRequest, {"prompt": 42}, "prompt", "invalid_value"),
        (CompletionRequest, {"prompt": {"text": "a"}}, "prompt", "invalid_value"),
        (CompletionRequest, {}, "prompt", "missing_parameter"),
        (CompletionRequest, {"prompt": "a", "bogus": 1}, "bogus", "unknown_parameter"),
        (CompletionRequest, {"prompt": "a", "stop": ["x", 1]}, "stop.1", "invalid_value"),
        (ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_value"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages.0.content.0.text",
            "invalid_value",
        ),
        (ChatCompletionRequest, {"messages": [{"role": "user"}]}, "messages.0.content", "missing_parameter"),
    ],
)
def test_the_error_names_the_parameter_as_sent(kind, body, param, code):
    problem = _problem(kind, body)
    assert (problem.status, problem.param, problem.code) == (400, param, code), problem.message
    assert repr(param) in problem.message


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        (CompletionRequest, {"prompt": "a\ud800b"}, "prompt"),  # a lone surrogate, as JSON's "\ud800" decodes
        (CompletionRequest, {"prompt": "a", "stop": "x\ud800"}, "stop"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages.0.content.0.text",
        ),
        (CompletionRequest, {"prompt": "a", "seed": 2**64}, "seed"),  # torch's manual_seed would overflow
        (CompletionRequest, {"prompt": "a", "seed": -(2**63) - 1}, "seed"),
        (CompletionRequest, {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_text_no_tokenizer_can_encode_and_out_of_range_seeds_are_named(kind, body, param):
    problem = _problem(kind, body)
    assert (problem.status, problem.param) == (400, param), problem.message


def test_openai_request_forms_that_are_valid():
    # A stop string of any length (the 4-item limit is on the list), as OpenAI clients send for chat transcripts.
    assert CompletionRequest.model_validate({"prompt": "a", "stop": "\n\nHuman:"}).stop_strings == ["\n\nHuman:"]
    # An empty stop string would end every reply at its first character: it is no stop string.
    assert CompletionRequest.model_validate({"prompt": "a", "stop": ""}).stop_strings == []
    assert CompletionRequest.model_validate({"prompt": "a", "stop": ["", "x"]}).stop_strings == ["x"]
    # null means "not given", as OpenAI reads it: the defaults apply.
    nulls = {"prompt": "a", "max_tokens": None, "temperature": None, "top_p": None, "stream": None, "seed": None}
    parsed = CompletionRequest.model_validate(nulls)
    assert (parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.stream) == (16, 1.0, 1.0, False)
    assert CompletionRequest.model_validate({"prompt": "a", "seed": 2**64 - 1}).seed == 2**64 - 1
