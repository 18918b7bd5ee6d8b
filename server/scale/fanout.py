"""Splitting a multi-prompt completion into one request per prompt, and joining the answers, so that
each prompt can go to the replica that holds its prefix (lm-eval batches prompts of different items
into one request).

Only what a single server would answer the same way is split: a non-streamed /v1/completions whose
prompts are all token ids, within the whole request's limits (--max-prompts, --max-request-tokens,
which each part alone would no longer see). Everything else goes whole to one replica, so its
errors and its numbers are exactly a single server's. The ingress sends the whole request again
when a part fails, so a client sees the error a single server gives, with its prompt index.
"""

from __future__ import annotations

import json
import time
from typing import Any

from server.config import Settings

# Request and response bodies are JSON objects as the client or a replica sent them (a replica's
# answers are its CompletionResponse); read with the checks below, not trusted to have a shape.
JSONObject = dict[str, Any]


def route_key(body: JSONObject | None) -> list[int] | str | None:
    """What the router matches replicas' prefixes against: the first prompt, if there is one."""
    if not isinstance(body, dict):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt)):
        return prompt
    messages = body.get("messages")  # chat: the rendered prompt starts with the first message
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        content = messages[0].get("content")
        return content if isinstance(content, str) else None
    return None


def _token_lists(prompt: Any) -> list[list[int]] | None:
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt)
    ):
        return prompt
    return None


def split(path: str, body: JSONObject, settings: Settings, body_bytes: int = 0) -> list[JSONObject] | None:
    """One body per prompt, or None: the request goes whole. Each part repeats every field but the
    prompt, so a request whose other fields are large (a long `stop` list, `logit_bias`) goes whole
    rather than being copied once per prompt: the parts may hold at most twice the body's bytes,
    + 4 kB each (`body_bytes`: the request body's size)."""
    max_tokens, n = body.get("max_tokens", 16), body.get("n", 1)
    n = 1 if n is None else n
    # (type() is int: a bool is an int to Python, and an error to the strict request model)
    if path != "/v1/completions" or body.get("stream") or type(max_tokens) is not int or type(n) is not int or n < 1:
        return None
    prompts = _token_lists(body.get("prompt"))
    if prompts is None or len(prompts) > settings.max_prompts:
        return None
    cost = sum(len(p) + max_tokens + settings.job_overhead_tokens for p in prompts) * n  # as the server counts
    if cost > settings.max_request_tokens:
        return None
    rest = len(json.dumps({k: v for k, v in body.items() if k != "prompt"}))
    if rest * len(prompts) > 2 * body_bytes + 4096 * len(prompts):
        return None
    return [{**body, "prompt": [p]} for p in prompts]


def consistent(parts: list[JSONObject]) -> bool:
    """The parts came from replicas serving one model and build (during a rolling redeploy they
    may not have): only then may they be joined under one system_fingerprint."""
    return len({(part.get("model"), part.get("system_fingerprint")) for part in parts}) == 1


def join(parts: list[JSONObject], n: int) -> JSONObject:
    """The response a single server gives to the whole request: choices in prompt order (prompt p's
    sample s at index p * n + s), usage added up, one id."""
    first = parts[0]
    choices: list[JSONObject] = []
    for p, part in enumerate(parts):
        for choice in part["choices"]:
            choices.append({**choice, "index": p * n + choice["index"]})
    usage = {key: sum(part["usage"][key] for part in parts) for key in first["usage"]}
    return {**first, "created": int(time.time()), "choices": choices, "usage": usage}


def parse(body: bytes) -> JSONObject | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
