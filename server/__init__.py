"""logprobs-server: OpenAI-compatible /v1/completions with echo and per-token logprobs for local models.

A request's way through the package, top to bottom (each folder imports only those below it):

    app.py, cli.py        the ASGI app (create_app, its HTTP layers in one list) and the command line
    api.py                the routes
    state.py              what a running server holds, and where it is built (model, probes, engine)
    serving/              a request to engine jobs and back: the shared base, completions, chat, distributions
    observability/        metrics and the system fingerprint, beside the pipeline
    http/                 the schema (protocol), errors, and the Host/key, body-limit and request-id layers
    models/               finding the model to serve (a path, a Hub name, the default model)
    engine/               one model thread: admission, prefix reuse and shared passes, prefill, decode
    backends/             one module per kind of model (GGUF: llama.cpp; MLX), the registry of kinds,
                          start-up exactness probes
    numerics/             scoring (log-softmax, top-k, ranks), sampling
    text/                 the token table, token bytes to text, offsets and stop strings
    config.py             every setting, declared once (flags, LOGPROBS_* variables, --help)

    serve_ray.py, scale/  beside it all: Ray Serve's ingress and model replicas, prefix-affinity
                          routing, splitting multi-prompt requests (the replicas run app.py's app)
"""

# llama.cpp's libraries are loaded first, before numpy or anything else of ours: on a CUDA build,
# a process that had loaded numpy (and requests) before llama_cpp crashed inside
# llama_model_load_from_file on an H200 machine, and loading llama_cpp first avoided it (issue 13;
# llama-cpp-python #1581 and #1903 report the same with pandas). Every entry point (`python -m
# server`, `logprobs-server`, `uvicorn server.app:app`, the Ray deployment) imports this package
# first. A process that imports numpy before it (a notebook, a test runner) is not covered.
import contextlib

# Not installed (an MLX-only setup) or its library fails to load: the GGUF backend imports it again
# when a GGUF file is served, and reports the error then.
with contextlib.suppress(Exception):
    import llama_cpp  # noqa: F401
