"""logprobs-server: OpenAI-compatible /v1/completions with echo and per-token logprobs for local models.

The pipeline, by module: protocol (HTTP schema) -> api + completions (request handling) ->
engine (one model worker) -> backends (llama.cpp) -> scoring (log-softmax, top-k math).
"""

# llama.cpp's libraries are loaded first, before numpy or anything else of ours: on a CUDA build,
# a process that had loaded numpy (and requests) before llama_cpp crashed inside
# llama_model_load_from_file on an H200 machine, and loading llama_cpp first avoided it (issue 13;
# llama-cpp-python #1581 and #1903 report the same with pandas). Every entry point (`python -m
# server`, `logprobs-server`, `uvicorn server.app:app`, the Ray deployment) imports this package
# first. A process that imports numpy before it (a notebook, a test runner) is not covered.
try:
    import llama_cpp  # noqa: F401
except Exception:  # not installed (an MLX-only setup) or its library fails to load: the GGUF backend
    pass  # imports it again when a GGUF file is served, and reports the error then
