"""Bad input gets a 4xx in OpenAI's error format that says what to fix, and the server goes on serving.

On both backends (`fixture_server`: the two-block fixture, vocabulary 49152, served with a context
of 2048 and the default --max-logprobs 20, on llama.cpp and on MLX)."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import FIXTURE_NAME

GOOD = {"prompt": "Hello", "max_tokens": 1}

CASES = [
    # (name, body (dict or raw bytes), expected status, expected param, words the message must hold)
    ("malformed json", b'{"prompt": "Hello", ', 400, None, "not valid JSON"),
    ("body not an object", b'["Hello"]', 400, None, "JSON object"),
    ("missing prompt", {"max_tokens": 1}, 400, "prompt", "Missing"),
    ("prompt wrong type", {"prompt": 5}, 400, "prompt", "prompt must be"),
    ("mixed prompt list", {"prompt": ["a", 1]}, 400, "prompt", "prompt must be"),
    ("boolean token ids", {"prompt": [True, False]}, 400, "prompt", "prompt must be"),
    ("empty prompt list", {"prompt": []}, 400, "prompt", "empty list"),
    ("empty token list", {"prompt": [[]]}, 400, "prompt", "empty"),
    ("empty string", {"prompt": ""}, 400, "prompt", "empty"),
    ("max_tokens wrong type", {"prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ("negative max_tokens", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens", "greater than or equal"),
    ("token id above vocab", {"prompt": [1, 2, 49152]}, 400, "prompt", "outside this model's vocabulary"),
    ("negative token id", {"prompt": [[1, 2], [-3]]}, 400, "prompt", "Prompt 1 holds token id -3"),
    ("prompt longer than context", {"prompt": [42] * 2100, "max_tokens": 0}, 400, "prompt", "do not fit"),
    ("prompt + max_tokens too long", {"prompt": [42] * 2000, "max_tokens": 100}, 400, "max_tokens", "2100"),
    (
        "prompt fills the context, max_tokens null",
        {"prompt": [42] * 2048, "max_tokens": None},
        400,
        "prompt",
        "does not fit",
    ),
    ("logprobs above limit", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs", "limit of 20"),
    ("negative logprobs", {"prompt": "Hi", "logprobs": -1}, 400, "logprobs", "greater than or equal"),
    ("temperature out of range", {"prompt": "Hi", "temperature": 5}, 400, "temperature", "less than or equal"),
    ("unknown model", {"prompt": "Hi", "model": "gpt-4"}, 404, "model", f"serves '{FIXTURE_NAME}'"),
    ("suffix", {"prompt": "Hi", "suffix": "end"}, 400, "suffix", "not supported"),
    ("best_of > n", {"prompt": "Hi", "best_of": 3}, 400, "best_of", "not supported"),
    ("n = 0", {"prompt": "Hi", "n": 0}, 400, "n", "greater than or equal"),
    ("five stop strings", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("logit_bias key not an id", {"prompt": "Hi", "logit_bias": {"hello": 5}}, 400, "logit_bias", "token ids"),
    ("logit_bias id outside vocab", {"prompt": "Hi", "logit_bias": {"99999999": 5}}, 400, "logit_bias", "vocabulary"),
    ("logit_bias value too big", {"prompt": "Hi", "logit_bias": {"42": 500}}, 400, "logit_bias", "-100..100"),
    (
        "stream_options wrong type",
        {"prompt": "Hi", "stream": True, "stream_options": 3},
        400,
        "stream_options",
        "stream_options",
    ),
    ("unknown field", {"prompt": "Hi", "max_tokenz": 3}, 400, "max_tokenz", "Unknown field"),
]


@pytest.mark.parametrize("name,body,status,param,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(fixture_server, name, body, status, param, words):
    if isinstance(body, bytes):
        response = requests.post(
            fixture_server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, timeout=30
        )
    else:
        response = fixture_server.post("/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"], error["message"]
    # ... and the server goes on serving.
    assert fixture_server.complete(**GOOD, model=FIXTURE_NAME)["model"] == FIXTURE_NAME


CHAT_CASES = [
    ("no messages", {"messages": []}, 400, "messages", "at least 1"),
    ("message without role", {"messages": [{"content": "hi"}]}, 400, "messages", "Missing"),
    (
        "top_logprobs above limit",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        "limit of 20",
    ),
    # OpenAI's param for a conversation past the context: the messages are the prompt.
    (
        "conversation too long",
        {"messages": [{"role": "user", "content": "hi " * 3000}]},
        400,
        "messages",
        "does not fit",
    ),
    (
        "conversation + max_tokens too long",
        {"messages": [{"role": "user", "content": "hi " * 1900}], "max_tokens": 500},
        400,
        "max_tokens",
        "do not fit",
    ),
    ("unknown model", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model", "not served"),
]


@pytest.mark.parametrize("name,body,status,param,words", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_request_gets_openai_error(fixture_server, name, body, status, param, words):
    response = fixture_server.post("/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    chat = fixture_server.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    )
    assert chat.status_code == 200, chat.text


def test_tokenizer_endpoint_errors(fixture_server):
    r = fixture_server.post("/detokenize", {"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert "outside this model's vocabulary (valid ids: 0..49151)" in r.json()["error"]["message"]
    r = fixture_server.post("/tokenize", {"text": "wrong field name"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "Missing" in r.json()["error"]["message"]
    r = requests.get(fixture_server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
