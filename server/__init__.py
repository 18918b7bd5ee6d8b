"""logprobs-server: OpenAI-compatible /v1/completions with echo and per-token logprobs for local models.

The pipeline, by module: protocol (HTTP schema) -> api + completions (request handling) ->
engine (one model worker) -> backends (llama.cpp) -> scoring (log-softmax, top-k math).
"""
