"""A client for logprobs-server: completions, per-continuation loglikelihoods as lm-eval computes
them, tokenization and server info, over httpx (sync and asyncio), with API keys, TLS and retries.
`logprobs-eval` (logprobs_client.cli) runs stock lm-eval against a server, compares two servers, and
measures KL divergence between builds (logprobs_client.kld)."""

from logprobs_client.client import AsyncClient, Client, base_url_of
from logprobs_client.types import (
    APIError,
    Completion,
    CompletionChoice,
    Distributions,
    Logprobs,
    ModelInfo,
    Score,
    Tokenized,
    TokenizerInfo,
    Usage,
)

__version__ = "0.1.0"
__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "Completion",
    "CompletionChoice",
    "Distributions",
    "Logprobs",
    "ModelInfo",
    "Score",
    "Tokenized",
    "TokenizerInfo",
    "Usage",
    "base_url_of",
]
