"""HTTP conformance: what the server answers besides its routes' own responses."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import serve


@pytest.fixture(scope="module")
def fuzzed(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "openapi", "--n-threads", "1", "--n-ctx", "512")


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/v1/completions", "POST"), ("DELETE", "/tokenize", "POST"), ("POST", "/health", "GET"),
    ("PATCH", "/v1/models", "GET"),
])
def test_a_wrong_method_is_405_with_allow(fuzzed, method, path, allowed):
    """RFC 9110: a 405 says which methods the path takes (schemathesis' check ST204 found it missing)."""
    response = requests.request(method, fuzzed.url + path, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == allowed
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
