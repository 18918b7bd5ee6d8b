"""Running stock lm-eval (`local-completions`) against a server, with what the server says about
itself: model id, context size and its remote tokenizer, the key in both places lm-eval reads
one, and a CA for both of lm-eval's HTTP stacks."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from logprobs_client.client import Client, base_url_of
from logprobs_client.types import ModelInfo, TokenizerInfo

# The project's offline task definitions (clients/lm_eval_tasks), when running from a checkout.
BUNDLED_TASKS = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
REDACTED = "***"


@dataclass(frozen=True)
class Target:
    """A server to evaluate: its URL, API key and the CA that signed its certificate (https)."""

    url: str
    api_key: str | None = None
    ca_cert: str | None = None

    @property
    def root(self) -> str:
        return base_url_of(self.url)


@dataclass(frozen=True)
class ServerInfo:
    model: ModelInfo
    tokenizer: TokenizerInfo

    @property
    def max_length(self) -> int | None:
        return self.model.max_model_len or self.tokenizer.model_max_length


@dataclass
class Options:
    """What the lm-eval run is asked to do; `extra` goes to lm-eval's command line unchanged."""

    tasks: str
    limit: str | None = None
    batch_size: int = 8
    num_concurrent: int = 2
    max_retries: int = 5
    timeout: int = 600
    max_length: int | None = None  # default: the server's context size
    include_path: str | None = None
    output_path: str | None = None
    log_samples: bool = False
    model_args: list[str] = field(default_factory=list)  # KEY=VALUE, added to (or replacing) ours
    apply_chat_template: bool = False  # the server's chat template, through logprobs_client.lm_eval_model
    extra: list[str] = field(default_factory=list)


def probe(target: Target, timeout: float = 30.0) -> ServerInfo:
    """The served model and tokenizer, from /v1/models and /tokenizer_info."""
    with Client(
        target.root, api_key=target.api_key, verify=target.ca_cert or True, timeout=timeout, max_retries=2
    ) as client:
        return ServerInfo(model=client.model_info(), tokenizer=client.tokenizer_info())


def _model_arg(key: str, value: object) -> str:
    text = str(value)
    if "," in text:
        raise ValueError(f"lm-eval's model_args cannot hold a comma: {key}={text!r}")
    return f"{key}={text}"


def model_args(target: Target, info: ServerInfo, options: Options) -> dict[str, str]:
    max_length = options.max_length or info.max_length
    args = {
        "base_url": f"{target.root}/v1/completions",
        "model": info.model.id,
        "tokenizer_backend": "remote",  # named: a refused tokenizer check must fail, not fall back to Hugging Face
        "tokenized_requests": "True",
        "num_concurrent": str(options.num_concurrent),
        "max_retries": str(options.max_retries),
        "timeout": str(options.timeout),
    }
    if max_length:
        args["max_length"] = str(max_length)
    if target.api_key:
        args["auth_token"] = target.api_key  # the remote tokenizer's key (completions read OPENAI_API_KEY)
    if target.ca_cert:
        args["ca_cert_path"] = str(Path(target.ca_cert).resolve())  # the remote tokenizer's CA
    for item in options.model_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg takes KEY=VALUE, not {item!r}")
        args[key] = value
    for key, value in args.items():
        _model_arg(key, value)
    return args


def command(target: Target, info: ServerInfo, options: Options, python: str = sys.executable) -> list[str]:
    """lm-eval's command line (as a list) for this server and these options."""
    if options.apply_chat_template:
        # lm-eval's own command line with a model that renders the server's template (see lm_eval_model);
        # lm-eval turns fewshot_as_multiturn on with it.
        argv = [python, "-m", "logprobs_client.lm_eval_model", "--model", "logprobs-completions"]
    else:
        argv = [python, "-m", "lm_eval", "--model", "local-completions"]
    argv += [
        "--model_args",
        ",".join(_model_arg(k, v) for k, v in model_args(target, info, options).items()),
        "--tasks",
        options.tasks,
        "--batch_size",
        str(options.batch_size),
    ]
    if options.apply_chat_template:
        argv.append("--apply_chat_template")
    include = options.include_path
    if include is None and BUNDLED_TASKS.is_dir():
        include = str(BUNDLED_TASKS)
    if include and include != "none":
        argv += ["--include_path", include]
    if options.limit is not None:
        argv += ["--limit", str(options.limit)]
    if options.output_path:
        argv += ["--output_path", options.output_path]
    if options.log_samples:
        argv.append("--log_samples")
    return argv + list(options.extra)


def redacted(argv: list[str], secret: str | None) -> str:
    """The command as a shell line, with the key replaced."""
    line = shlex.join(argv)
    return line.replace(secret, REDACTED) if secret else line


@contextmanager
def environment(target: Target) -> Iterator[dict[str, str]]:
    """lm-eval's environment: the key as OPENAI_API_KEY (its completion requests' Bearer), and
    for a private CA a bundle of the usual CAs plus that one as REQUESTS_CA_BUNDLE (requests,
    num_concurrent=1) and SSL_CERT_FILE (aiohttp, num_concurrent>1): lm-eval's ca_cert_path
    reaches only its tokenizer requests. The bundle lives in a temporary folder for the run."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if target.api_key:
        env["OPENAI_API_KEY"] = target.api_key
    else:
        env.pop("OPENAI_API_KEY", None)  # lm-eval would send any key found there
    with tempfile.TemporaryDirectory(prefix="logprobs-eval-") as folder:
        if target.ca_cert:
            import certifi

            bundle = Path(folder) / "ca-bundle.pem"
            bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + Path(target.ca_cert).read_bytes())
            env["REQUESTS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = str(bundle)
        yield env


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit(
            "logprobs-eval runs lm-eval, which is not installed here: "
            "pip install 'lm-eval[api]==0.4.13' (or the client's [eval] extra: pip install './clients[eval]')"
        )


def run(
    target: Target,
    info: ServerInfo,
    options: Options,
    *,
    stdout: IO[str] | IO[bytes] | None = None,
    log: IO[str] = sys.stderr,
) -> int:
    """Run lm-eval with inherited stdio (its progress bars and tables as usual; `stdout` to send
    its standard output elsewhere). Returns its exit status."""
    require_lm_eval()
    argv = command(target, info, options)
    print(f"logprobs-eval: {redacted(argv, target.api_key)}", file=log, flush=True)
    with environment(target) as env:
        return subprocess.run(argv, env=env, stdout=stdout).returncode
