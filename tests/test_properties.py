"""Properties, checked by hypothesis on generated inputs: the scoring math (server/numerics/scoring.py) for
any finite float32 logits, the request schema (server/http/protocol.py), and, on a live server, the
shape of echo/logprobs responses for random small valid requests and a 4xx in OpenAI's format
(never a 5xx) for invalid ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from server.http.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.numerics.scoring import score_rows
from tests.conftest import serve

# The same examples on every run (CI must not fail by chance), and no example database in the
# work tree; no deadline, as the server and a busy machine set the pace.
PROPERTIES = settings(derandomize=True, database=None, deadline=None)
EPS32 = float(np.finfo(np.float32).eps)
# Values that tie often (hypothesis also repeats values on its own), and any other finite float32.
LOGIT = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5]), st.floats(width=32, allow_nan=False, allow_infinity=False)
)


@st.composite
def scoring_case(draw, logit=LOGIT):
    n, n_vocab = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    logits = draw(hnp.arrays(np.float32, (n, n_vocab), elements=logit))
    targets = draw(hnp.arrays(np.int64, n, elements=st.integers(0, n_vocab - 1)))
    return logits, targets, draw(st.integers(0, n_vocab + 2))


# -- scoring ------------------------------------------------------------------------------------


@settings(PROPERTIES, max_examples=300)
@given(scoring_case())
def test_logprobs_are_never_positive_and_top_k_is_a_stable_sort(case):
    """x - lse <= 0 exactly in float32: the row's max term adds exp(0) = 1 to the sum, so its log is
    >= 0 and lse >= max >= x. Top-k: the best k logits, best first, the lowest id first among ties
    (as argmax's top-1), so a response's top tokens do not depend on how many were asked for."""
    logits, targets, k = case
    scored = score_rows(logits, targets, k)
    assert not np.isnan(scored.token_logprobs).any() and (scored.token_logprobs <= 0).all()
    assert not np.isnan(scored.top_logprobs).any() and (scored.top_logprobs <= 0).all()
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(scored.top_ids, expected)
    assert (np.diff(scored.top_logprobs, axis=1) <= 0).all()
    # A target among the top-k carries the very same float in both places (lm-eval compares with ==).
    for row, column in zip(*np.nonzero(scored.top_ids == targets[:, None])):
        assert scored.top_logprobs[row, column].tobytes() == scored.token_logprobs[row].tobytes()


@settings(PROPERTIES, max_examples=300)
@given(scoring_case(logit=st.floats(-(2.0**100), 2.0**100, width=32)))
def test_logprobs_agree_with_a_float64_log_softmax(case):
    """Within float32's rounding of the numbers involved: the logits' magnitude and spread, and
    one rounding per summed term."""
    logits, targets, k = case
    scored = score_rows(logits, targets, k)
    wide = logits.astype(np.float64)
    row_max = wide.max(axis=1, keepdims=True)
    reference = wide - (row_max + np.log(np.exp(wide - row_max).sum(axis=1, keepdims=True)))
    magnitude = np.abs(wide).max(axis=1)
    spread = wide.max(axis=1) - wide.min(axis=1)
    tolerance = 4 * EPS32 * (magnitude + spread + logits.shape[1] + 1)
    rows = np.arange(len(targets))
    assert (np.abs(scored.token_logprobs - reference[rows, targets]) <= tolerance).all()
    top_reference = np.take_along_axis(reference, scored.top_ids, axis=1)
    assert (np.abs(scored.top_logprobs - top_reference) <= tolerance[:, None]).all()


@settings(PROPERTIES, max_examples=100)
@given(scoring_case(), st.integers(2, 4))
def test_threads_give_the_same_bits(case, threads):
    logits, targets, k = case
    one, many = score_rows(logits, targets, k), score_rows(logits, targets, k, threads=threads)
    for a, b in (
        (one.token_logprobs, many.token_logprobs),
        (one.top_ids, many.top_ids),
        (one.top_logprobs, many.top_logprobs),
    ):
        assert a.tobytes() == b.tobytes()


@settings(PROPERTIES, max_examples=100)
@given(scoring_case(logit=st.one_of(st.sampled_from([0.0, 1.0, -1.0]), st.floats(-100.0, 100.0, width=32))))
def test_mlx_scoring_picks_the_same_top_k(case):
    """The MLX path (its own logsumexp, so values differ in the last bits) keeps the same tokens in
    the same order, ties to the lowest id included."""
    mx = pytest.importorskip("mlx.core")
    from server.backends.mlx_scoring import score_rows_mlx

    logits, targets, k = case
    on_device, on_host = score_rows_mlx(mx.array(logits), targets, k), score_rows(logits, targets, k)
    np.testing.assert_array_equal(on_device.top_ids, on_host.top_ids)
    assert np.abs(on_device.token_logprobs - on_host.token_logprobs).max() < 1e-4


# -- the request schema -------------------------------------------------------------------------

TOKEN_IDS = st.lists(st.integers(0, 2**31), min_size=1, max_size=8)
TEXT = st.text(min_size=1, max_size=20)
PROMPT_FORMS = st.one_of(
    TEXT.map(lambda p: (p, [p])),
    st.lists(TEXT, min_size=1, max_size=4).map(lambda p: (p, p)),
    TOKEN_IDS.map(lambda p: (p, [p])),
    st.lists(TOKEN_IDS, min_size=1, max_size=4).map(lambda p: (p, p)),
)
OPTIONAL = {
    "max_tokens": st.none() | st.integers(0, 10**6),
    "logprobs": st.none() | st.integers(0, 100),
    "echo": st.booleans(),
    "temperature": st.none() | st.floats(0, 2),
    "top_p": st.none() | st.floats(0.01, 1),
    "top_k": st.none() | st.integers(-1, 100),
    "n": st.none() | st.integers(1, 10),
    "seed": st.none() | st.integers(-(2**63), 2**64 - 1),
    "stream": st.none() | st.booleans(),
    "stop": st.none() | st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=4),
    "logit_bias": st.none() | st.dictionaries(st.integers(0, 10**6).map(str), st.floats(-100, 100), max_size=3),
}


@settings(PROPERTIES, max_examples=200)
@given(PROMPT_FORMS, st.fixed_dictionaries({}, optional=OPTIONAL))
def test_any_valid_completion_request_keeps_its_prompt_shape(prompt, fields):
    sent, normalized = prompt
    body = json.loads(json.dumps({"prompt": sent, **fields}))  # as it arrives: JSON
    request = CompletionRequest.model_validate(body)
    assert request.prompt == normalized
    for name, value in fields.items():
        assert getattr(request, name) == value


# Each field of a JSON type, and values of other JSON types: strict, so "5", true and 1.5 are not
# integers, "0.5" and true not numbers, 1 and "true" not booleans.
WRONG_TYPES = {
    "integer": st.one_of(
        st.booleans(),
        st.text(max_size=5),
        st.floats(allow_nan=False).filter(lambda x: not x.is_integer()),
        st.lists(st.integers(), max_size=2),
        st.just({}),
    ),
    "number": st.one_of(st.booleans(), st.text(max_size=5), st.lists(st.floats(), max_size=2), st.just({})),
    "boolean": st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.just([]), st.just({})),
}
COMPLETION_FIELDS = {
    "max_tokens": "integer",
    "logprobs": "integer",
    "n": "integer",
    "seed": "integer",
    "top_k": "integer",
    "best_of": "integer",
    "temperature": "number",
    "top_p": "number",
    "min_p": "number",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "repetition_penalty": "number",
    "echo": "boolean",
    "stream": "boolean",
}


@st.composite
def wrongly_typed(draw, fields):
    name = draw(st.sampled_from(sorted(fields)))
    return name, draw(WRONG_TYPES[fields[name]])


@settings(PROPERTIES, max_examples=200)
@given(wrongly_typed(COMPLETION_FIELDS))
def test_values_of_another_json_type_are_refused(field):
    name, value = field
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", name: value})


@settings(PROPERTIES, max_examples=100)
@given(
    wrongly_typed(
        {
            "max_tokens": "integer",
            "max_completion_tokens": "integer",
            "top_logprobs": "integer",
            "logprobs": "boolean",
            "add_generation_prompt": "boolean",
            "temperature": "number",
        }
    )
)
def test_chat_values_of_another_json_type_are_refused(field):
    name, value = field
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], name: value})


@settings(PROPERTIES)
@given(st.sampled_from(["max_tokens", "logprobs", "n", "top_k"]), st.integers(1, 10))
def test_a_number_without_a_fraction_is_an_integer(name, value):
    """JSON has one number type, and JSON Schema counts 5.0 as an integer: so does the server."""
    assert getattr(CompletionRequest.model_validate({"prompt": "x", name: float(value)}), name) == value
    assert DetokenizeRequest.model_validate({"tokens": [float(value)]}).tokens == [value]


def test_tokenizer_requests_are_strict_too():
    for bad in (
        {"prompt": "x", "add_special_tokens": "false"},
        {"prompt": "x", "add_special_tokens": 0},
        {"prompt": 5},
    ):
        with pytest.raises(ValidationError):
            TokenizeRequest.model_validate(bad)
    for bad in ({"tokens": ["1"]}, {"tokens": [True]}, {"tokens": [1.5]}):
        with pytest.raises(ValidationError):
            DetokenizeRequest.model_validate(bad)


# -- on a live server ---------------------------------------------------------------------------

MAX_LOGPROBS = 5
N_VOCAB = 49152  # the default model's (SmolLM2)


@pytest.fixture(scope="module")
def small(model_path, tmp_path_factory):
    """One llama.cpp thread (so it runs well on a busy machine) and a small context."""
    yield from serve(
        model_path,
        tmp_path_factory,
        "properties",
        "--n-threads",
        "1",
        "--n-ctx",
        "256",
        "--max-logprobs",
        str(MAX_LOGPROBS),
        "--max-n",
        "2",
    )


SMALL_REQUEST = st.fixed_dictionaries(
    {
        "prompt": st.lists(st.lists(st.integers(0, N_VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=2),
        "echo": st.booleans(),
        "logprobs": st.integers(0, MAX_LOGPROBS),
        "max_tokens": st.integers(0, 3),
        "temperature": st.sampled_from([0.0, 0.7, 1.0]),
        "n": st.integers(1, 2),
        "seed": st.integers(0, 2**32),
    }
)


@settings(PROPERTIES, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=SMALL_REQUEST)
def test_echo_logprobs_have_the_documented_shape(small, body):
    response = small.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    out = response.json()
    prompts, n, k = body["prompt"], body["n"], body["logprobs"]
    assert [c["index"] for c in out["choices"]] == list(range(len(prompts) * n))
    generated = 0
    for choice in out["choices"]:
        prompt = prompts[choice["index"] // n]
        lp = choice["logprobs"]
        tokens, values, tops, offsets = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]
        assert len(tokens) == len(values) == len(tops) == len(offsets)
        n_generated = len(tokens) - (len(prompt) if body["echo"] else 0)
        assert 0 <= n_generated <= body["max_tokens"]
        generated += n_generated
        # The first entry is null exactly when it is the echoed prompt's first token.
        assert [i for i, v in enumerate(values) if v is None] == ([0] if body["echo"] else [])
        assert [i for i, t in enumerate(tops) if t is None] == ([0] if body["echo"] else [])
        for token, value, top in zip(tokens, values, tops):
            if top is None:
                continue
            assert value <= 0 and token in top and len(top) <= k + 1
            assert all(v <= 0 for v in top.values())
        assert offsets == sorted(offsets) and all(0 <= o <= len(choice["text"]) for o in offsets)
    usage = out["usage"]
    assert usage["prompt_tokens"] == sum(len(p) for p in prompts)
    assert usage["completion_tokens"] == generated == usage["total_tokens"] - usage["prompt_tokens"]


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
BAD_PROMPTS = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.just([]),
    st.just([[]]),
    st.just({}),
    st.lists(st.booleans(), min_size=1, max_size=3),  # booleans are not token ids
    st.lists(st.integers(-(2**40), -1), min_size=1, max_size=3),  # negative ids
    st.lists(st.integers(N_VOCAB, 2**62), min_size=1, max_size=3),  # past the vocabulary
    st.tuples(st.text(min_size=1, max_size=3), st.integers(0, 9)).map(list),  # a string and an id
    st.lists(
        st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), min_size=1, max_size=2), min_size=1, max_size=2
    ),  # three levels
)
BAD_FIELDS = st.one_of(
    st.tuples(st.just("prompt"), BAD_PROMPTS),
    wrongly_typed(COMPLETION_FIELDS),
    st.tuples(st.sampled_from(["max_tokens", "logprobs", "n"]), st.integers(max_value=-1)),  # out of range
    st.tuples(st.just("logprobs"), st.integers(MAX_LOGPROBS + 1, 2**62)),  # past --max-logprobs
    st.tuples(st.just("n"), st.integers(3, 2**62)),  # past --max-n
    st.tuples(st.just("max_tokens"), st.integers(300, 2**62)),  # past the context
    st.tuples(st.sampled_from(["temperature", "top_p", "min_p"]), st.floats(2.01, 1e300) | st.floats(-1e300, -0.01)),
    st.tuples(
        st.just("logit_bias"),
        st.dictionaries(
            st.text(max_size=4).filter(lambda s: not s.isdigit()), st.floats(-1, 1), min_size=1, max_size=2
        ),
    ),
    st.tuples(
        st.text(min_size=1, max_size=8).filter(lambda s: s not in CompletionRequest.model_fields), JSON_VALUE
    ),  # an unknown field
)


@settings(PROPERTIES, max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=BAD_FIELDS)
def test_invalid_requests_get_a_4xx_in_openai_format(small, field):
    name, value = field
    response = small.post("/v1/completions", {"prompt": [[1, 2, 3]], "max_tokens": 1, name: value})
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@settings(PROPERTIES, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON_VALUE, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]))
def test_any_json_body_gets_an_answer_below_500(small, body, path):
    assume(not (isinstance(body, dict) and body.get("stream")))
    response = small.post(path, body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
