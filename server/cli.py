"""`logprobs-server` / `python -m server`: the same settings as LOGPROBS_* variables, as flags."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from dataclasses import fields

from server.backends import detect_backend
from server.config import ENV_PREFIX, ConfigError, Settings

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logprobs-server", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    env_defaults = Settings.from_env()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = getattr(env_defaults, f.name)
        shown = "" if default is None else f" (now: {default})"
        parser.add_argument(flag, dest=f.name, type=f.metadata["type"], default=default,
                            help=f"{f.metadata['help']} [env {env}]{shown}")
    return parser


def _preload_openblas(argv: list[str]) -> None:
    """mlx[cpu] on Linux ships a reference BLAS ~40x slower than OpenBLAS; a library is only
    replaced at process start, so restart this process with OpenBLAS preloaded when it exists."""
    from server.backends.mlx import find_openblas, openblas_preloaded

    if not sys.platform.startswith("linux") or openblas_preloaded() or not (blas := find_openblas()):
        return
    print(f"logprobs-server: MLX backend: restarting with LD_PRELOAD={blas} (OpenBLAS)", file=sys.stderr, flush=True)
    preload = " ".join(p for p in (os.environ.get("LD_PRELOAD"), blas) if p)
    os.execve(sys.executable, [sys.executable, "-m", "server", *argv], {**os.environ, "LD_PRELOAD": preload})


def main(argv: list[str] | None = None) -> None:
    try:
        settings = Settings(**vars(build_parser().parse_args(argv)))
        settings.validate()
        # Fail before starting the server, with a message, not a traceback.
        kind = detect_backend(Path(settings.model)) if settings.model else "gguf"
    except ConfigError as exc:
        sys.exit(f"logprobs-server: error: {exc}")
    if kind == "mlx":
        _preload_openblas(sys.argv[1:] if argv is None else argv)
    import uvicorn

    # The app reads its settings from the environment, so `uvicorn server.app:app` and this CLI
    # share one configuration path.
    os.environ.update(settings.to_env())
    uvicorn.run("server.app:app", host=settings.host, port=settings.port, log_level=settings.log_level)
