"""What a hostile or careless client can send: every limit answers a 4xx that names its setting,
before any model work; the queue bound answers 429 with Retry-After; a request past
--request-timeout is answered 503; input that used to cause a 500 does not, and one request's
bad sampling never fails another's generation. One server, started with tight limits."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import pytest
import requests

from tests.conftest import serve

LIMITS = {
    "--max-body-bytes": 65536,
    "--max-prompts": 8,
    "--max-n": 2,
    "--max-request-tokens": 3000,
    "--max-queued-tokens": 3000,
    "--default-max-tokens": 8,
    "--max-sequences": 4,
}


@pytest.fixture(scope="module")
def tight(model_path, tmp_path_factory):
    flags = [str(x) for pair in LIMITS.items() for x in pair]
    yield from serve(model_path, tmp_path_factory, "tight", *flags)


@pytest.fixture(scope="module")
def impatient(model_path, tmp_path_factory):
    yield from serve(model_path, tmp_path_factory, "impatient", "--request-timeout", "2")


def error_of(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "payload,setting,param",
    [
        ({"prompt": ["a"] * 9, "max_tokens": 1}, "--max-prompts", "prompt"),
        ({"prompt": "a", "n": 3, "max_tokens": 1}, "--max-n", "n"),
        ({"prompt": [[5] * 1000] * 3, "max_tokens": 1}, "--max-request-tokens", "prompt"),
        ({"prompt": [5] * 1000, "n": 2, "max_tokens": 600}, "--max-request-tokens", "prompt"),
    ],
)
def test_each_limit_names_its_setting(tight, payload, setting, param):
    error = error_of(tight.post("/v1/completions", payload), 400)
    assert setting in error["message"] and error["param"] == param


def test_chat_max_tokens_count_in_the_request_limit(tight):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1490, "n": 2}
    assert "--max-request-tokens" in error_of(tight.post("/v1/chat/completions", body), 400)["message"]


def test_body_limit_declared_and_streamed(tight):
    big = {"prompt": "x" * 70000, "max_tokens": 1}
    error = error_of(tight.post("/v1/completions", big), 413)
    assert "--max-body-bytes" in error["message"]

    # The same body sent in chunks without a Content-Length: cut off while it arrives.
    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    response = requests.post(
        tight.url + "/v1/completions", data=chunks(), timeout=60, headers={"Content-Type": "application/json"}
    )
    assert "--max-body-bytes" in error_of(response, 413)["message"]
    assert tight.complete(prompt="Hi", max_tokens=1)["choices"]


def test_default_max_tokens_bounds_requests_that_name_no_length(tight):
    chat = tight.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0}
    ).json()
    assert chat["usage"]["completion_tokens"] <= 8
    info = requests.get(tight.url + "/tokenizer_info").json()
    eos = tight.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"][0]
    out = tight.complete(prompt="Once upon a time", max_tokens=None, temperature=0, logit_bias={str(eos): -100})
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"


def queued_tokens(server) -> float:
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^logprobs_queue_tokens (\S+)$", metrics, re.M).group(1))


def test_queue_bound_answers_429_with_retry_after(tight):
    """Fill the queue: 8 distinct prompts of 340 tokens (2,984 tokens of work with the 32 each prompt
    counts for; 4 run at once, 4 wait), and once over 1,000 tokens wait (the /metrics gauge), ask
    for 2,164 more: 429 with
    Retry-After, nothing of it queued; the first request comes back whole."""
    first: dict = {}

    def long_request():
        prompts = [[100 + 13 * i + j % 7 for j in range(340)] for i in range(8)]  # distinct: no prefix reuse
        first["response"] = tight.post(
            "/v1/completions", {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1}
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while queued_tokens(tight) < 1000:
            assert time.monotonic() < deadline and thread.is_alive(), (
                first.get("response") and first["response"].text[:500]
            )
            time.sleep(0.02)
        refused = tight.post("/v1/completions", {"prompt": [[9] * 1000] * 2, "max_tokens": 50})
    finally:
        thread.join(120)
    error = error_of(refused, 429)
    assert "--max-queued-tokens" in error["message"] and error["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert first["response"].status_code == 200
    assert len(first["response"].json()["choices"]) == 8
    assert queued_tokens(tight) == 0


def test_request_timeout_answers_503_and_stops_the_work(impatient):
    """--request-timeout 2 and a 1,900-token generation (tens of seconds): 503, plain and streamed,
    and the work is cancelled (the log says so) rather than left running."""
    info = requests.get(impatient.url + "/tokenizer_info").json()
    eos = impatient.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"][0]
    long = {"prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0, "logit_bias": {str(eos): -100}}
    error = error_of(impatient.post("/v1/completions", long), 503)
    assert error["code"] == "timeout" and "--request-timeout" in error["message"]
    # Streamed: the headers are out, so the error arrives as an event and the stream ends.
    with requests.post(impatient.url + "/v1/completions", json=long | {"stream": True}, stream=True, timeout=60) as r:
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "timeout"
    assert "[DONE]" not in events[-1]
    deadline = time.monotonic() + 30
    while impatient.log().count("request cancelled") < 2:
        assert time.monotonic() < deadline, impatient.log()[-2000:]
        time.sleep(0.1)
    assert requests.get(impatient.url + "/health", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize(
    "name,body,status",
    [
        ("tiny repetition penalty", {"repetition_penalty": 5e-324}, 200),
        ("denormal temperature", {"temperature": 1e-320}, 200),
        ("negative seed", {"seed": -1, "temperature": 1.0}, 200),
        ("seed beyond 64 bits", {"seed": 2**64}, 400),
        ("superscript digit key", {"logit_bias": {"²": 1}}, 400),
        ("double minus key", {"logit_bias": {"--5": 1}}, 400),
        ("5000-digit key", {"logit_bias": {"9" * 5000: 1}}, 400),
    ],
)
def test_input_that_used_to_500(tight, name, body, status):
    response = tight.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3} | body)
    assert response.status_code == status, (name, response.text)
    if status == 400:
        assert "Traceback" not in response.text and "Error:" not in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ],
)
def test_chat_input_that_used_to_500(tight, body, param):
    payload = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | body
    assert error_of(tight.post("/v1/chat/completions", payload), 400)["param"] == param


def test_text_content_parts_render_and_others_are_refused(tight):
    """Text parts render as the same text sent whole; a part the model cannot see (an image) is a
    400 naming it, never dropped silently (the model would answer a question it never saw)."""
    text = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    ask = {"max_tokens": 2, "temperature": 0}
    out = tight.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]} | ask)
    whole = tight.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}]} | ask)
    assert out.status_code == 200, out.text
    assert out.json()["usage"] == whole.json()["usage"]
    assert out.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]
    image = [*text[:1], {"type": "image_url", "image_url": {"url": "x"}}, *text[1:]]
    error = error_of(tight.post("/v1/chat/completions", {"messages": [{"role": "user", "content": image}]} | ask), 400)
    assert error["param"] == "messages" and "image_url" in error["message"]


def test_bad_sampling_in_one_request_never_fails_another(tight):
    """With --max-sequences 4, three streams decode while a fourth request asks for a denormal
    temperature and penalty: every stream ends with [DONE], every text is complete."""
    results: dict[int, list[str]] = {}

    def stream(i: int):
        payload = {"prompt": f"Story {i}:", "max_tokens": 40, "temperature": 0.7, "seed": i, "stream": True}
        with requests.post(tight.url + "/v1/completions", json=payload, stream=True, timeout=120) as r:
            results[i] = [line for line in r.iter_lines(decode_unicode=True) if line]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(5):
        hostile = tight.post(
            "/v1/completions", {"prompt": "Hi", "max_tokens": 20, "temperature": 1e-320, "repetition_penalty": 5e-324}
        )
        assert hostile.status_code == 200
    for t in threads:
        t.join(120)
    for i in range(3):
        assert results[i][-1] == "data: [DONE]", results[i][-3:]


def test_malformed_http_does_not_hurt(tight):
    """Garbage on the socket, a cut-off body, a wrong content type: the server keeps serving."""
    for raw in (b"GARBAGE\r\n\r\n", b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro'):
        with socket.create_connection(("127.0.0.1", tight.port), timeout=5) as s:
            s.sendall(raw)
    response = requests.post(
        tight.url + "/v1/completions",
        data="prompt=hi",
        timeout=30,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert 400 <= response.status_code < 500
    assert tight.complete(prompt="Hi", max_tokens=1)["choices"]


def test_sigterm_lets_a_running_request_finish_then_exits_0(model_path, tmp_path):
    from testing.live_server import LiveServer

    live = LiveServer(model_path, tmp_path / "server.log", "--n-ctx", "512", "--shutdown-grace", "60")
    try:
        answer: dict = {}

        def generate():
            answer["response"] = live.post(
                "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 80, "temperature": 0}
            )

        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(0.5)
        live.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        assert live.proc.wait(60) == 0
        assert answer["response"].status_code == 200
        assert answer["response"].json()["usage"]["completion_tokens"] > 0
        with pytest.raises(requests.ConnectionError):  # no longer accepting
            requests.get(live.url + "/health", timeout=5)
    finally:
        live.stop()


def test_sigterm_past_the_grace_period_answers_503_and_exits_0(model_path, tmp_path):
    """8 requests in flight (one long generation, seven scoring requests queued behind it) and a 1 s
    grace: each is answered, a 503 in OpenAI's format with Retry-After (lm-eval retries those) where
    the grace cut it, and the log holds no traceback."""
    from testing.live_server import LiveServer

    live = LiveServer(model_path, tmp_path / "server.log", "--n-ctx", "2048", "--shutdown-grace", "1")
    answers: dict[int, requests.Response | Exception] = {}
    try:
        long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)

        def send(i: int):
            payload = (
                {"prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0}
                if i == 0
                else {"prompt": f"{i} {long_prompt}", "max_tokens": 0, "echo": True, "logprobs": 1}
            )
            try:
                answers[i] = live.post("/v1/completions", payload)
            except requests.RequestException as exc:
                answers[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        time.sleep(1.0)
        started = time.monotonic()
        live.proc.send_signal(signal.SIGTERM)
        assert live.proc.wait(60) == 0
        for thread in threads:
            thread.join(60)
        statuses = sorted(
            a.status_code if isinstance(a, requests.Response) else type(a).__name__ for a in answers.values()
        )
        print(f"exited {time.monotonic() - started:.1f} s after SIGTERM; answers: {statuses}")
        cut = [a for a in answers.values() if isinstance(a, requests.Response) and a.status_code == 503]
        assert len(answers) == 8 and all(isinstance(a, requests.Response) for a in answers.values()), statuses
        assert (
            set(statuses) <= {200, 503} and isinstance(answers[0], requests.Response) and answers[0].status_code == 503
        )
        for response in cut:
            assert error_of(response, 503)["code"] == "shutting_down" and int(response.headers["Retry-After"]) >= 1
        # 1,900 tokens take far longer than the 1 s grace: the generation was cancelled, not finished.
        assert "request cancelled" in live.log() and "Traceback" not in live.log(), live.log()[-3000:]
    finally:
        live.stop()
