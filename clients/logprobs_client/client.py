"""Client and AsyncClient for a logprobs-server (or any server with the same endpoints).

Each call is written once, as a generator that yields the HTTP calls it needs (a list at a time:
calls that can run together) and receives their JSON bodies; Client runs those one by one,
AsyncClient concurrently. Retries, auth and TLS live in the two drivers' shared policy.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import os
import ssl
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict, TypeVar, cast

import httpx

from logprobs_client.types import APIError, Completion, Distributions, ModelInfo, Score, Tokenized, TokenizerInfo

if TYPE_CHECKING:  # typing_extensions is no dependency of the client: annotations only
    from typing_extensions import Unpack

log = logging.getLogger("logprobs_client")

T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 502, 503, 504})
ENDPOINT_SUFFIXES = ("/v1/completions", "/v1/chat/completions", "/v1")


class Call(NamedTuple):
    method: str
    path: str
    json: Any = None
    binary: bool = False  # the answer is bytes (/v1/distributions), not JSON


Operation = Generator[list[Call], list[Any], T]

# What `verify=` takes: True (system CAs), False, a CA file, or an ssl.SSLContext.
Verify = bool | str | os.PathLike[str] | ssl.SSLContext
# A prompt for /v1/completions: a string, a list of strings, token ids, or a list of token-id lists.
Prompt = str | list[str] | list[int] | list[list[int]]


class ClientOptions(TypedDict, total=False):
    """The keyword options of Client and AsyncClient (see _Base.__init__)."""

    api_key: str | None
    verify: Verify
    timeout: float | httpx.Timeout | None
    max_retries: int
    backoff: float
    max_wait: float
    model: str | None
    on_retry: Callable[[int, Exception, float], None] | None


def base_url_of(url: str) -> str:
    """The server's root URL, from its root or from a URL lm-eval style (…/v1/completions, …/v1)."""
    url = url.rstrip("/")
    for suffix in ENDPOINT_SUFFIXES:
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def ssl_verify(verify: Verify) -> bool | ssl.SSLContext:
    """httpx's verify= for True/False, a CA file (PEM: a private CA, or a bundle), or a context."""
    if isinstance(verify, (str, os.PathLike)):
        return ssl.create_default_context(cafile=os.fspath(verify))
    return verify


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def api_error(response: httpx.Response) -> APIError:
    """The APIError for a non-2xx response (OpenAI's {"error": {...}} when the body is one)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return APIError(
            response.status_code,
            str(error.get("message", "")),
            type=error.get("type"),
            code=error.get("code"),
            param=error.get("param"),
            retry_after=_retry_after_seconds(response.headers.get("retry-after")),
            body=body,
        )
    return APIError(
        response.status_code,
        response.text[:500] or response.reason_phrase,
        retry_after=_retry_after_seconds(response.headers.get("retry-after")),
        body=body,
    )


def _is_retryable_exception(exc: Exception) -> bool:
    """Connection refused or dropped: retry. A TLS failure (wrong CA, wrong name) or a read
    timeout (the server may still be working on it): do not."""
    if not isinstance(
        exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
    ):
        return False
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return False
        cause = cause.__cause__ or cause.__context__
    return True


class _Base:
    """What Client and AsyncClient share: settings, the retry policy, and every operation."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        verify: Verify = True,
        timeout: float | httpx.Timeout | None = 300.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_wait: float = 60.0,
        model: str | None = None,
        on_retry: Callable[[int, Exception, float], None] | None = None,
    ):
        """base_url: the server (http(s)://host:port, …/v1 and …/v1/completions accepted too).
        api_key: sent as `Authorization: Bearer KEY`. verify: True (system CAs), False, a CA file,
        or an ssl.SSLContext. timeout: seconds per HTTP request (or an httpx.Timeout).
        max_retries: retries after the first attempt on 429, 502, 503, 504 and dropped
        connections; the wait is the response's Retry-After when it has one, else `backoff`
        doubling at each retry; either way at most `max_wait` seconds. model: sent as the
        requests' "model" (None: not sent; the server uses its only model). on_retry(attempt,
        error, wait) is called before each retry's wait."""
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url_of(base_url)
        self.model = model
        self.max_retries, self.backoff, self.max_wait = max_retries, backoff, max_wait
        self.on_retry = on_retry
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._verify = ssl_verify(verify)
        self._timeout = timeout
        self._tokenizer_info: TokenizerInfo | None = None
        self._prefix_token: int | None = None

    # -- the retry policy ---------------------------------------------------------------------------

    def _wait_before_retry(self, attempt: int, error: Exception) -> float | None:
        """Seconds to wait before retry number attempt+1 after `error`, or None: give up (raise it)."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, APIError):
            if error.status not in RETRY_STATUSES:
                return None
            wait = error.retry_after if error.retry_after is not None else self.backoff * 2**attempt
        elif _is_retryable_exception(error):
            wait = self.backoff * 2**attempt
        else:
            return None
        wait = min(wait, self.max_wait)
        log.info("retry %d/%d in %.1f s after %s", attempt + 1, self.max_retries, wait, error)
        if self.on_retry is not None:
            self.on_retry(attempt + 1, error, wait)
        return wait

    def _settle(self, call: Call, attempt: int, outcome: httpx.Response | Exception) -> tuple[bool, Any]:
        """The retry loop's one decision, for both drivers: after attempt number `attempt` (0 the
        first) gave `outcome` (a response, or the transport error), (True, the JSON body, or for a
        binary call the response), or (False, seconds to wait before trying again); the error
        itself once retrying is over."""
        if isinstance(outcome, httpx.Response):
            if outcome.is_success:
                return True, outcome if call.binary else outcome.json()
            outcome = api_error(outcome)
        wait = self._wait_before_retry(attempt, outcome)
        if wait is None:
            raise outcome
        return False, wait

    # -- operations (generators of HTTP calls) ------------------------------------------------------

    def _with_model(self, payload: dict[str, Any], model: str | None) -> dict[str, Any]:
        model = model or self.model
        return payload | {"model": model} if model else payload

    def _op_health(self) -> Operation[bool]:
        (body,) = yield [Call("GET", "/health")]
        return isinstance(body, dict) and body.get("status") == "ok"

    def _op_models(self) -> Operation[list[ModelInfo]]:
        (body,) = yield [Call("GET", "/v1/models")]
        return [ModelInfo.from_json(entry) for entry in body["data"]]

    def _op_tokenizer_info(self) -> Operation[TokenizerInfo]:
        if self._tokenizer_info is None:
            (body,) = yield [Call("GET", "/tokenizer_info")]
            self._tokenizer_info = TokenizerInfo.from_json(body)
        return self._tokenizer_info

    def _op_tokenize(self, text: str, add_special_tokens: bool, model: str | None) -> Operation[Tokenized]:
        (body,) = yield [
            Call(
                "POST", "/tokenize", self._with_model({"prompt": text, "add_special_tokens": add_special_tokens}, model)
            )
        ]
        return Tokenized(tokens=body["tokens"], count=body["count"], max_model_len=body.get("max_model_len"))

    def _op_distributions(
        self, tokens: Sequence[int], start: int, dtype: str, model: str | None
    ) -> Operation[Distributions]:
        (response,) = yield [
            Call(
                "POST",
                "/v1/distributions",
                self._with_model({"prompt": list(tokens), "start": start, "dtype": dtype}, model),
                binary=True,
            )
        ]
        headers = response.headers
        return Distributions(
            rows=int(headers["x-rows"]),
            vocab=int(headers["x-vocab"]),
            dtype=headers["x-dtype"],
            start=int(headers["x-start"]),
            data=response.content,
            system_fingerprint=headers.get("x-system-fingerprint"),
        )

    def _op_detokenize(self, tokens: Sequence[int], model: str | None) -> Operation[str]:
        (body,) = yield [Call("POST", "/detokenize", self._with_model({"tokens": list(tokens)}, model))]
        text: str = body["prompt"]
        return text

    def _op_complete(
        self,
        prompt: Prompt,
        max_tokens: int | None,
        temperature: float | None,
        logprobs: int | None,
        echo: bool,
        stop: str | list[str] | None,
        seed: int | None,
        n: int | None,
        model: str | None,
        extra: dict[str, Any],
    ) -> Operation[Completion]:
        if extra.get("stream"):
            raise ValueError("complete() does not stream; leave stream unset")
        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "echo": echo}
        for key, value in (
            ("temperature", temperature),
            ("logprobs", logprobs),
            ("stop", stop),
            ("seed", seed),
            ("n", n),
        ):
            if value is not None:
                payload[key] = value
        (body,) = yield [Call("POST", "/v1/completions", self._with_model(payload | extra, model))]
        return Completion.from_json(body)

    def _op_prefix_token(self) -> Operation[int]:
        """lm-eval's context for an empty context: the BOS token's id, else EOS's (remote tokenizer rules)."""
        if self._prefix_token is None:
            info = yield from self._op_tokenizer_info()
            ids = {}
            for name, text in (("bos", info.bos_token), ("eos", info.eos_token)):
                if text is not None:
                    ids[name] = (yield from self._op_tokenize(text, False, None)).tokens[0]
            # lm-eval: `bos_token_id or eos_token_id` (so a BOS id of 0 falls through to EOS, as there).
            prefix = ids.get("bos") or ids.get("eos")
            if prefix is None:
                raise ValueError("the server's tokenizer has neither a BOS nor an EOS token for an empty context")
            self._prefix_token = prefix
        return self._prefix_token

    def _op_encode_pairs(
        self, context: str | Sequence[int], continuations: Sequence[str | Sequence[int]]
    ) -> Operation[list[tuple[list[int], list[int]]]]:
        """(context tokens, continuation tokens) for each continuation, split as lm-eval splits them:
        trailing spaces of the context move to the continuation; context+continuation is
        tokenized whole and the continuation is what follows the context's own tokens; an empty
        context is the prefix token (BOS, else EOS). Token ids are used as given."""
        if not isinstance(context, str):
            if any(isinstance(c, str) for c in continuations):
                raise TypeError("a context given as token ids needs continuations given as token ids")
            return [(list(context), list(c)) for c in cast("Sequence[Sequence[int]]", continuations)]  # checked above
        texts = [c for c in continuations if isinstance(c, str)]
        if context == "":
            prefix = yield from self._op_prefix_token()
            bodies = yield [Call("POST", "/tokenize", {"prompt": c, "add_special_tokens": False}) for c in texts]
            encoded = iter(body["tokens"] for body in bodies)
            pairs = []
            for c in continuations:
                if not isinstance(c, str):
                    pairs.append(([prefix], list(c)))
                    continue
                tokens = next(encoded)
                # lm-eval: when the continuation already starts with the prefix token, that token is the context.
                pairs.append(([prefix], tokens) if not tokens or tokens[0] != prefix else (tokens[:1], tokens[1:]))
            return pairs
        n_spaces = len(context) - len(context.rstrip())
        stem, moved = (context[:-n_spaces], context[-n_spaces:]) if n_spaces else (context, "")
        bodies = yield [
            Call("POST", "/tokenize", {"prompt": text, "add_special_tokens": False})
            for text in [stem] + [stem + moved + c for c in texts]
        ]
        context_tokens, wholes = bodies[0]["tokens"], iter(body["tokens"] for body in bodies[1:])
        return [
            (context_tokens, next(wholes)[len(context_tokens) :] if isinstance(c, str) else list(c))
            for c in continuations
        ]

    def _op_score(
        self,
        context: str | Sequence[int],
        continuations: str | Sequence[str | Sequence[int]],
        model: str | None,
        batch_size: int,
    ) -> Operation[list[Score]]:
        if isinstance(continuations, str):
            continuations = [continuations]
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        pairs = yield from self._op_encode_pairs(context, continuations)
        if any(not ctx for ctx, _ in pairs):
            raise ValueError(
                "the context has no tokens of its own (only spaces?): the first continuation token "
                "would have nothing to be conditioned on"
            )
        prompts = [ctx + cont for ctx, cont in pairs]
        calls = [
            Call(
                "POST",
                "/v1/completions",
                self._with_model(
                    {
                        "prompt": prompts[i : i + batch_size],
                        "max_tokens": 0,
                        "echo": True,
                        "logprobs": 1,
                        "temperature": 0,
                    },
                    model,
                ),
            )
            for i in range(0, len(prompts), batch_size)
        ]
        bodies = yield calls
        choices = [choice for body in bodies for choice in sorted(body["choices"], key=lambda c: c["index"])]
        if len(choices) != len(prompts):
            raise RuntimeError(f"asked to score {len(prompts)} prompts, got {len(choices)} choices back")
        scores = []
        for (ctx, cont), text, choice in zip(pairs, continuations, choices):
            lp = choice["logprobs"]
            if len(lp["token_logprobs"]) != len(ctx) + len(cont):
                raise RuntimeError(
                    f"expected logprobs for {len(ctx) + len(cont)} echoed tokens, got {len(lp['token_logprobs'])}"
                )
            values, tops = lp["token_logprobs"][len(ctx) :], lp["top_logprobs"][len(ctx) :]
            scores.append(
                Score(
                    continuation=text if isinstance(text, str) else None,
                    context_tokens=ctx,
                    continuation_tokens=cont,
                    tokens=lp["tokens"][len(ctx) :],
                    token_logprobs=values,
                    top_logprobs=tops,
                    loglikelihood=sum(values),  # in order, as lm-eval sums
                    is_greedy=all(v == max(top.values()) for v, top in zip(values, tops)),
                )
            )
        return scores


class Client(_Base):
    """A synchronous client. Use as a context manager, or call close()."""

    def __init__(self, base_url: str, **options: Unpack[ClientOptions]) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, verify=self._verify, timeout=self._timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, call: Call) -> Any:
        for attempt in itertools.count():
            try:
                outcome: httpx.Response | Exception = self._http.request(call.method, call.path, json=call.json)
            except httpx.TransportError as exc:
                outcome = exc
            done, value = self._settle(call, attempt, outcome)
            if done:
                return value
            time.sleep(value)

    def _run(self, operation: Operation[T]) -> T:
        try:
            calls = next(operation)
            while True:
                calls = operation.send([self._request(call) for call in calls])
        except StopIteration as done:
            result: T = done.value  # the operation's return value
            return result

    def health(self) -> bool:
        """GET /health: True when the server answers {"status": "ok"}."""
        return self._run(self._op_health())

    def models(self) -> list[ModelInfo]:
        return self._run(self._op_models())

    def model_info(self) -> ModelInfo:
        """The served model (the first of /v1/models)."""
        return self.models()[0]

    def tokenizer_info(self) -> TokenizerInfo:
        return self._run(self._op_tokenizer_info())

    def tokenize(self, text: str, *, add_special_tokens: bool = True, model: str | None = None) -> Tokenized:
        """POST /tokenize. add_special_tokens=True (the endpoint's default) adds BOS where the
        tokenizer does; lm-eval tokenizes with False."""
        return self._run(self._op_tokenize(text, add_special_tokens, model))

    def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return self._run(self._op_detokenize(tokens, model))

    def distributions(
        self, tokens: Sequence[int], *, start: int = 0, dtype: str = "float32", model: str | None = None
    ) -> Distributions:
        """POST /v1/distributions (logprobs-server's extension): the full log-distribution at each
        position of a token-id prompt from `start` on, as bytes (Distributions.array() with numpy)."""
        return self._run(self._op_distributions(tokens, start, dtype, model))

    def complete(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        model: str | None = None,
        **extra: Any,  # any other request field: JSON, sent as given
    ) -> Completion:
        """POST /v1/completions (not streamed). prompt: a string, a list of strings, token ids, or
        a list of token-id lists; `extra`: any other field of the request (top_k, logit_bias, ...)."""
        return self._run(
            self._op_complete(prompt, max_tokens, temperature, logprobs, echo, stop, seed, n, model, extra)
        )

    def score(
        self,
        context: str | Sequence[int],
        continuations: str | Sequence[str | Sequence[int]],
        *,
        model: str | None = None,
        batch_size: int = 16,
    ) -> list[Score]:
        """The loglikelihood of each continuation after `context`, and whether it is greedy, as
        lm-eval's local-completions computes them (same token split, same sum): one Score per
        continuation, in order. Texts or token ids; prompts go `batch_size` to a request, with
        echo, logprobs=1 and max_tokens=0."""
        return self._run(self._op_score(context, continuations, model, batch_size))


class AsyncClient(_Base):
    """The asyncio client: the same methods, awaited; calls that can run together do (at most
    `max_concurrency` requests at once). Use as an async context manager, or await aclose()."""

    def __init__(self, base_url: str, *, max_concurrency: int = 4, **options: Unpack[ClientOptions]) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, verify=self._verify, timeout=self._timeout
        )
        self._max_concurrency = max_concurrency

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, call: Call) -> Any:
        for attempt in itertools.count():
            try:
                outcome: httpx.Response | Exception = await self._http.request(call.method, call.path, json=call.json)
            except httpx.TransportError as exc:
                outcome = exc
            done, value = self._settle(call, attempt, outcome)
            if done:
                return value
            await asyncio.sleep(value)

    async def _run(self, operation: Operation[T]) -> T:
        limit = asyncio.Semaphore(self._max_concurrency)

        async def bounded(call: Call) -> Any:
            async with limit:
                return await self._request(call)

        try:
            calls = next(operation)
            while True:
                calls = operation.send(list(await asyncio.gather(*(bounded(call) for call in calls))))
        except StopIteration as done:
            result: T = done.value  # the operation's return value
            return result

    async def health(self) -> bool:
        return await self._run(self._op_health())

    async def models(self) -> list[ModelInfo]:
        return await self._run(self._op_models())

    async def model_info(self) -> ModelInfo:
        return (await self.models())[0]

    async def tokenizer_info(self) -> TokenizerInfo:
        return await self._run(self._op_tokenizer_info())

    async def tokenize(self, text: str, *, add_special_tokens: bool = True, model: str | None = None) -> Tokenized:
        return await self._run(self._op_tokenize(text, add_special_tokens, model))

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return await self._run(self._op_detokenize(tokens, model))

    async def distributions(
        self, tokens: Sequence[int], *, start: int = 0, dtype: str = "float32", model: str | None = None
    ) -> Distributions:
        return await self._run(self._op_distributions(tokens, start, dtype, model))

    async def complete(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        model: str | None = None,
        **extra: Any,  # any other request field: JSON, sent as given
    ) -> Completion:
        return await self._run(
            self._op_complete(prompt, max_tokens, temperature, logprobs, echo, stop, seed, n, model, extra)
        )

    async def score(
        self,
        context: str | Sequence[int],
        continuations: str | Sequence[str | Sequence[int]],
        *,
        model: str | None = None,
        batch_size: int = 16,
    ) -> list[Score]:
        return await self._run(self._op_score(context, continuations, model, batch_size))
