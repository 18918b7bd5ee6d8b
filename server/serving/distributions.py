"""/v1/distributions, this server's extension beside the OpenAI API: the full log-distribution over
the vocabulary at each position of a token-id prompt, in binary (a row of SmolLM2's is 196 kB as
float32; as JSON it would be ~1.2 MB), so that a client can compute the KL divergence between two
runtimes exactly (`logprobs-eval kld`). Top-k alternatives cannot give it: docs/kld.md measures
how little of the KL a top-k partition recovers.

The body is the rows, little-endian, row after row ([rows, n_vocab]); headers say the shape and
type. Bounded like every request (--max-request-tokens, the queue) and by --max-distribution-values
(rows x vocabulary per response).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi.responses import Response

from server.engine import Origin, Outputs, PromptJob, PromptResult
from server.http.errors import APIError
from server.http.protocol import DistributionsRequest
from server.serving.base import check_fits, check_model, check_request_cost, check_token_ids, submit

if TYPE_CHECKING:  # the serving code is handed the state; it never builds one
    from server.state import ServerState

MEDIA_TYPE = "application/octet-stream"
DTYPES = {"float32": "<f4", "float16": "<f2"}


def build_job(state: ServerState, request: DistributionsRequest) -> PromptJob:
    check_model(state, request.model)
    tokens = request.prompt
    check_token_ids(state, tokens, param="prompt", where="The prompt")
    last = len(tokens) - 2  # the last row that predicts a prompt token
    if request.start > last:
        raise APIError(
            f"start={request.start} is past the last row ({last}) of a {len(tokens)}-token prompt; row i is "
            "the distribution of the token after prompt[:i + 1].",
            param="start",
        )
    values, limit = (last + 1 - request.start) * state.backend.info.n_vocab, state.settings.max_distribution_values
    if values > limit:
        raise APIError(
            f"{last + 1 - request.start} rows of {state.backend.info.n_vocab} log-probabilities are "
            f"{values} values, past this server's limit of {limit} per response "
            "(--max-distribution-values): ask for fewer rows (a later start, a shorter prompt).",
            param="prompt",
            code="limit_exceeded",
        )
    check_fits(state, tokens, 0, "The prompt")
    job = PromptJob(tokens=tokens, max_tokens=0, outputs=Outputs.of(distributions_from=request.start))
    check_request_cost(state, [job])
    return job


async def create_distributions(
    state: ServerState, request: DistributionsRequest, origin: Origin, deadline: float | None = None
) -> Response:
    job = build_job(state, request)
    result: PromptResult | None = None
    async for _, item in submit(state, [job], progress=False, origin=origin):
        assert isinstance(item, PromptResult)  # without progress, only results come
        result = item
    # The job's one result, with its rows from `start` (build_job: at least one row).
    assert result is not None and result.distributions is not None
    rows = result.distributions
    body = rows.astype(DTYPES[request.dtype], copy=False).tobytes()
    return Response(
        body,
        media_type=MEDIA_TYPE,
        headers={
            "x-rows": str(rows.shape[0]),
            "x-vocab": str(rows.shape[1]),
            "x-dtype": request.dtype,
            "x-start": str(request.start),
            "x-system-fingerprint": state.fingerprint.short,
        },
    )
