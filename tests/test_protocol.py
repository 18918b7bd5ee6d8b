"""The request schema (server/http/protocol.py) on its own, no HTTP: the prompt's four forms, unknown
fields, and fields this server refuses rather than ignores."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.http.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize(
    "prompt,normalized",
    [
        ("Hi", ["Hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_the_four_prompt_forms_become_a_list_of_prompts(prompt, normalized):
    assert CompletionRequest(prompt=prompt).prompt == normalized


@pytest.mark.parametrize("prompt", [[], [1, "a"], [[1], "a"], [True, 2], [[1.5]], None, 5, {"a": 1}])
def test_other_prompts_are_refused(prompt):
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=prompt)


def test_unknown_fields_are_refused_not_ignored():
    with pytest.raises(ValidationError, match="extra"):
        CompletionRequest(prompt="Hi", max_token=5)
    with pytest.raises(ValidationError, match="extra"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tempreature=0)


def test_unsupported_fields_name_themselves():
    assert CompletionRequest(prompt="x").unsupported() is None
    assert CompletionRequest(prompt="x", best_of=2, n=2).unsupported() is None
    assert CompletionRequest(prompt="x", suffix="y").unsupported()[0] == "suffix"
    assert CompletionRequest(prompt="x", best_of=3).unsupported()[0] == "best_of"


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", 2.1),
        ("top_p", 0.0),
        ("n", 0),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("max_tokens", -1),
        ("logprobs", -1),
        ("top_k", -2),
    ],
)
def test_ranges(field, value):
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **{field: value})


def test_stop_list_and_defaults():
    assert CompletionRequest(prompt="x").stop_list() == []
    assert CompletionRequest(prompt="x", stop="\n").stop_list() == ["\n"]
    assert CompletionRequest(prompt="x", stop=["a", "b"]).stop_list() == ["a", "b"]
    request = CompletionRequest(prompt="x")
    assert (request.max_tokens, request.echo, request.logprobs, request.n) == (16, False, None, 1)
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).max_tokens is None
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])
