"""The published OpenAPI schema (GET /openapi.json) tells the truth, checked by schemathesis
against a live server.

Each operation gets schemathesis' phases: the schema's examples, its coverage of boundaries and of
invalid values, then up to MAX_EXAMPLES fuzzed requests (valid and invalid), with a fixed seed.
Every response goes through all of schemathesis' checks: no 5xx, a declared status, a declared
content type, a body (and each streamed event) that matches the declared schema, declared headers
present, invalid input refused. The server runs with small limits, so that no generated request
holds the model for long. The last test reports how many requests each operation answered 2xx, and
needs some for each endpoint that does work.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest
import requests

from server.app import create_app
from server.config import Settings
from tests.conftest import serve

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 50  # fuzzed requests per operation (valid and invalid)
SEED = 20240601  # the same requests on every run
# Seconds each phase of each operation may take: past them its remaining cases are generated but
# not sent (a bound for slow or busy machines; every phase took under 15 s when this was written).
BUDGET_S = 25
# Limits that keep each request cheap: a generated request costs at most 80 tokens of model time
# (48 tokens, or fewer with more prompts: each prompt also counts --job-overhead-tokens, 32).
# One llama.cpp thread: the other core is the fuzzer's (two threads that wait on each other ran
# 10x slower when the machine was busy).
FLAGS = [
    "--n-threads",
    "1",
    "--n-ctx",
    "512",
    "--max-request-tokens",
    "80",
    "--max-queued-tokens",
    "4096",
    "--default-max-tokens",
    "4",
    "--max-n",
    "2",
    "--max-prompts",
    "4",
    "--max-logprobs",
    "5",
    "--max-body-bytes",
    "65536",
    "--request-timeout",
    "60",
]
# Operations whose generated requests must include some that the server serves (2xx).
MUST_SERVE = ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize")

# operation -> "phase mode" (e.g. "fuzzing positive") -> statuses answered
STATUSES: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
STARTED: dict[tuple[str, str], float] = {}


def load_schema():
    """The document that GET /openapi.json serves (test_the_served_schema_is_this_one checks it),
    built here without a model: schemathesis needs it when pytest collects the tests (its loader
    from a fixture fails on pytest 9)."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "checks": {
                # A request that is valid by the schema can still be refused with 400: a token id
                # outside this model's vocabulary, a prompt longer than its context, a limit the schema
                # cannot know (they are the server's settings). The 2xx are counted instead.
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]},
                # 413: an invalid body can also be too large.
                "negative_data_rejection": {"expected-statuses": ["400", "404", "405", "413"]},
            },
        }
    )
    return schemathesis.openapi.from_dict(OPENAPI, config=config)


OPENAPI = create_app(Settings()).openapi()
schema = load_schema()


@pytest.fixture(scope="module")
def fuzzed(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "openapi", *FLAGS)


def test_the_served_schema_is_this_one(fuzzed):
    assert requests.get(fuzzed.url + "/openapi.json", timeout=10).json() == OPENAPI


def test_the_schema_declares_what_the_server_sends():
    """No FastAPI 422 (validation errors are 400s), every error in OpenAI's format, streams and
    /metrics in their own media types, and the prompt's four forms."""
    declared = {}
    for path, operations in OPENAPI["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            declared[f"{method.upper()} {path}"] = sorted(int(status) for status in responses)
            for status, response in responses.items():
                if status != "200":
                    assert response["content"] == {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    }
                else:
                    assert all(entry.get("schema") or entry.get("itemSchema") for entry in response["content"].values())
    generation = [200, 400, 401, 404, 413, 429, 500, 503]
    assert declared == {
        "POST /v1/completions": generation,
        "POST /v1/chat/completions": generation,
        "POST /v1/distributions": generation,
        "POST /tokenize": [200, 400, 401, 404, 413, 500],
        "POST /detokenize": [200, 400, 401, 404, 413, 500],
        "GET /v1/models": [200, 400, 401, 413, 500],
        "GET /tokenizer_info": [200, 400, 401, 413, 500],
        "GET /health": [200, 400, 413, 500],
        "GET /metrics": [200, 400, 401, 413, 500],
    }
    assert "HTTPValidationError" not in OPENAPI["components"]["schemas"]
    completions = OPENAPI["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert completions["429"]["headers"]["Retry-After"]["required"]
    assert set(OPENAPI["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    distributions = OPENAPI["paths"]["/v1/distributions"]["post"]["responses"]["200"]["content"]
    assert set(distributions) == {"application/octet-stream"}
    prompt = OPENAPI["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert [(form["type"], form.get("items", {}).get("type")) for form in prompt["anyOf"]] == [
        ("string", None),
        ("array", "string"),
        ("array", "integer"),
        ("array", "array"),
    ]


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("PUT", "/v1/completions", "POST"),
        ("DELETE", "/tokenize", "POST"),
        ("POST", "/health", "GET"),
        ("PATCH", "/v1/models", "GET"),
    ],
)
def test_a_wrong_method_is_405_with_allow(fuzzed, method, path, allowed):
    """RFC 9110: a 405 says which methods the path takes (schemathesis' check ST204 found it missing)."""
    response = requests.request(method, fuzzed.url + path, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == allowed
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def guarded(model_path, tmp_path_factory):
    yield from serve(
        model_path,
        tmp_path_factory,
        "openapi-keys",
        "--n-threads",
        "1",
        "--n-ctx",
        "512",
        "--api-key",
        "sk-openapi",
        "--max-body-bytes",
        "2048",
    )


@pytest.mark.parametrize(
    "method,path,body,key,status",
    [
        ("GET", "/v1/models", None, None, 401),
        ("GET", "/metrics", None, None, 401),
        ("POST", "/tokenize", {"prompt": "Hi"}, "sk-wrong", 401),
        ("GET", "/health", None, None, 200),
        ("POST", "/v1/completions", {"prompt": "x" * 5000}, "sk-openapi", 413),
        ("GET", "/metrics", None, "sk-openapi", 200),
    ],
)
def test_refusals_of_a_guarded_server_conform(guarded, method, path, body, key, status):
    """The statuses the fuzzed server (no keys, a large body limit) does not send: 401 with
    WWW-Authenticate, 413; all checks but those that send requests of their own."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    operation = schema[path][method]
    case = operation.Case(body=body, headers=headers) if body is not None else operation.Case(headers=headers)
    response = case.call(base_url=guarded.url, timeout=30)
    assert response.status_code == status
    checks = schemathesis.checks
    case.validate_response(
        response,
        checks=[
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_headers_conformance,
            checks.response_schema_conformance,
        ],
    )


@schema.parametrize()
def test_api_conforms_to_its_schema(case, fuzzed):
    phase = case.meta.phase.name.value
    started = STARTED.setdefault((case.operation.label, phase), time.monotonic())
    if time.monotonic() - started > BUDGET_S:
        return
    response = case.call(base_url=fuzzed.url, timeout=60)
    STATUSES[case.operation.label][f"{phase} {case.meta.generation.mode.value}"][response.status_code] += 1
    case.validate_response(response)


def test_a_real_share_of_generated_requests_is_served(fuzzed):
    if not STATUSES:
        pytest.skip("the schemathesis test did not run")
    report = []
    for operation, kinds in sorted(STATUSES.items()):
        for kind, statuses in sorted(kinds.items()):
            ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
            report.append(
                f"{operation} {kind}: {sum(statuses.values())} requests, {ok} answered 2xx "
                f"({dict(sorted(statuses.items()))})"
            )
    print("\n" + "\n".join(report))
    for operation in MUST_SERVE:
        served = sum(
            n for statuses in STATUSES[operation].values() for status, n in statuses.items() if 200 <= status < 300
        )
        assert served > 0, f"{operation}: no generated request was served\n" + "\n".join(report)
    assert requests.get(fuzzed.url + "/health", timeout=10).json() == {"status": "ok"}
