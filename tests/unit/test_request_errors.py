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
