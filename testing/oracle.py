"""Independent references for what the server must return.

They share no code with the server: no engine, no scoring module, no backend class. Log-softmax
is done here in float64; greedy decoding is a plain argmax loop.

- LlamaOracle: logits from llama-cpp-python's high-level `Llama.eval` (logits for every position,
  its own batching and buffers), tokenization by `Llama.tokenize`.
- MlxOracle: logits from calling the mlx-lm model in-process, tokenization by its HF tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


class Oracle(ABC):
    bos_id: int | None
    eos_id: int | None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` with special-token text parsed, no BOS added (lm-eval's tok_encode)."""

    @abstractmethod
    def logprob_matrix(self, tokens: list[int]) -> np.ndarray:
        """[n, vocab] float64: row i is log p(. | tokens[:i+1])."""

    @abstractmethod
    def _first_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits after the prompt; starts an incremental decode."""

    @abstractmethod
    def _next_logits(self, token: int) -> np.ndarray:
        """Logits after appending one token to the incremental decode."""

    @abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    @abstractmethod
    def detokenize(self, tokens: list[int]) -> str: ...

    def loglikelihood(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """lm-eval's (sum of continuation logprobs, whether each continuation token is the argmax)."""
        tokens = context + continuation
        rows = self.logprob_matrix(tokens)[len(context) - 1 : len(tokens) - 1]
        lp = rows[np.arange(len(continuation)), continuation]
        return float(lp.sum()), bool((rows.argmax(axis=1) == np.array(continuation)).all())

    def greedy(self, tokens: list[int], max_tokens: int, stop: list[str]) -> str:
        """Greedy continuation: argmax at each step, ends at an end-of-generation token or a stop string."""
        out: list[int] = []
        logits = self._first_logits(tokens)
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            if self.is_end_of_generation(token):
                break
            out.append(token)
            text = self.detokenize(out)
            hits = [text.find(s) for s in stop if s and s in text]
            if hits:
                return text[: min(hits)]
            logits = self._next_logits(token)
        return self.detokenize(out)


class LlamaOracle(Oracle):
    def __init__(self, model_path: str, n_ctx: int = 2048, kv_cache_type: str = "f32"):
        import llama_cpp

        self._ll = llama_cpp
        kv = llama_cpp.GGML_TYPE_F32 if kv_cache_type == "f32" else llama_cpp.GGML_TYPE_F16
        self.llm = llama_cpp.Llama(
            model_path=model_path, n_ctx=n_ctx, logits_all=True, verbose=False, type_k=kv, type_v=kv
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.bos_id, self.eos_id = self.llm.token_bos(), self.llm.token_eos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logprob_matrix(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return log_softmax64(np.array(self.llm.scores[: len(tokens)]))

    def _first_logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[self.llm.n_tokens - 1])

    def _next_logits(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return np.array(self.llm.scores[self.llm.n_tokens - 1])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")


class MlxOracle(Oracle):
    def __init__(self, folder: str):
        from mlx_lm import load

        self.model, wrapper = load(folder)
        self.hf = wrapper._tokenizer
        self._eog = set(wrapper.eos_token_ids) | {self.hf.eos_token_id}
        self.bos_id, self.eos_id = self.hf.bos_token_id, self.hf.eos_token_id

    def _logits(self, tokens: list[int], cache=None):
        import mlx.core as mx

        return np.array(self.model(mx.array(tokens)[None], cache=cache)[0].astype(mx.float32))

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def logprob_matrix(self, tokens: list[int]) -> np.ndarray:
        return log_softmax64(self._logits(tokens))

    def _first_logits(self, tokens: list[int]) -> np.ndarray:
        from mlx_lm.models.cache import make_prompt_cache

        self._cache = make_prompt_cache(self.model)
        return self._logits(tokens, self._cache)[-1]

    def _next_logits(self, token: int) -> np.ndarray:
        return self._logits([token], self._cache)[-1]

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    def detokenize(self, tokens: list[int]) -> str:
        return self.hf.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
