"""`logprobs-server` / `python -m server`: the same settings as LOGPROBS_* variables, as flags."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Literal, NoReturn, TypedDict, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from server.backends import KINDS, kind_of
from server.config import ConfigError, Settings, env_name, flag_name
from server.http.security import check_exposure
from server.models import resolve_model

DESCRIPTION = """\
Serve a local model with an OpenAI-compatible /v1/completions endpoint that returns exact
per-token logprobs with echo, plus vLLM's /tokenize, /detokenize and /tokenizer_info, so that
lm-evaluation-harness's `local-completions` model evaluates it over HTTP.

Every flag can also be set as an environment variable: --n-ctx 4096 is LOGPROBS_N_CTX=4096.
Flags win over the environment."""

EPILOG = """\
examples:
  logprobs-server                                   # the default model (SmolLM2-135M Q4_1)
  logprobs-server --model ./model.gguf --port 9000
  lm_eval --model local-completions --tasks hellaswag \\
    --model_args base_url=http://127.0.0.1:8000/v1/completions,tokenized_requests=True --batch_size 8"""


def choices_of(annotation: object) -> tuple[Any, ...] | None:
    """The values of a Literal[...] or Literal[...] | None annotation, as typing.get_args gives them."""
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return None


def _flag_help(name: str, field: FieldInfo, environ: dict[str, str]) -> str:
    env = env_name(name)
    shown = "" if field.default is None else f"; default: {field.default}"
    if environ.get(env):
        shown += "; now: set" if field.annotation == SecretStr | None else f"; now: {environ[env]}"
    return f"{field.description} [env {env}{shown}]".replace("%", "%%")  # argparse %-formats help


class _SwitchArgs(TypedDict, total=False):
    """add_argument's keywords that make a flag a switch (a bool field's)."""

    nargs: str
    const: str


class _TLSArgs(TypedDict, total=False):
    """uvicorn.run's keywords for HTTPS (given only with a certificate)."""

    ssl_certfile: str | None
    ssl_keyfile: str | None


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field. Flags are read as text and Settings.load validates them like
    the environment's values, so a bad flag or variable gets the same one-line message."""
    parser = argparse.ArgumentParser(
        prog="logprobs-server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    environ = {key.upper(): value for key, value in os.environ.items()}  # pydantic-settings ignores case
    for name, field in Settings.model_fields.items():
        choices = choices_of(field.annotation)
        # A bare switch (--allow-no-auth) means true; --allow-no-auth false works too.
        switch: _SwitchArgs = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        metavar = "{" + ",".join(choices) + "}" if choices else ("BOOL" if switch else None)
        parser.add_argument(
            flag_name(name), dest=name, metavar=metavar, help=_flag_help(name, field, environ), **switch
        )
    return parser


def _fail(exc: ConfigError) -> NoReturn:
    """A setting the user must fix: one line on stderr, exit status 2 (as for a bad flag)."""
    print(f"logprobs-server: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    try:
        # The environment, with the flags given on top.
        settings = Settings.load(**vars(build_parser().parse_args(argv)))
        # Keys, hosts and TLS files, and no keyless serving beyond loopback: before the model loads.
        warnings = check_exposure(settings)
        # The model found (a Hub name fetched, or found in the cache) and its kind told, before the
        # server starts: a problem is one line and exit status 2, not a traceback.
        from server.app import configure_logging

        configure_logging(settings.log_level)  # now: fetching a Hub model logs what it took
        model = resolve_model(settings)
        kind = KINDS[model.kind] if model.kind else kind_of(model.path)
    except ConfigError as exc:
        _fail(exc)
    kind.prepare_process(sys.argv[1:] if argv is None else argv)
    for warning in warnings:  # after the restart, so said once
        print(f"logprobs-server: warning: {warning}", file=sys.stderr, flush=True)
    import uvicorn

    from server.app import create_app

    try:
        app = create_app(settings, model=model)  # reads the key file again: it may have changed since
    except ConfigError as exc:
        _fail(exc)
    tls: _TLSArgs = (
        {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile} if settings.ssl_certfile else {}
    )
    # SIGTERM: uvicorn stops accepting, gives running requests --shutdown-grace seconds, then
    # cancels the rest (their engine jobs with them); the lifespan closes the model; exit 0.
    # uvicorn re-raises the SIGTERM it caught once it has shut down; this handler makes that a
    # clean exit (status 0), as a service manager expects after a requested stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # The HTTP parser: llhttp (refuses ambiguous framing), with a bound on slow requests (server/http/connections.py).
    from server.http.connections import protocol_with

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn annotates int, but the value only bounds asyncio.timeout(): fractions of a second work.
        timeout_graceful_shutdown=settings.shutdown_grace,  # type: ignore[arg-type]
        http=protocol_with(settings.request_read_timeout),
        **tls,
    )
