"""An independent reference for what the server must return.

It shares no code with the server: logits come from llama-cpp-python's high-level `Llama.eval`
(logits for every position, its own batching and buffers), log-softmax is done here in float64,
tokenization goes through `Llama.tokenize`, and greedy decoding is a plain argmax loop.
"""

from __future__ import annotations

import numpy as np


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


class LlamaOracle:
    def __init__(self, model_path: str, n_ctx: int = 2048):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=256, logits_all=True,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def logprob_matrix(self, tokens: list[int]) -> np.ndarray:
        """[n, vocab] float64: row i is log p(. | tokens[:i+1])."""
        self.llm.reset()
        self.llm.eval(tokens)
        return log_softmax64(np.array(self.llm.scores[: len(tokens)]))

    def token_logprobs(self, tokens: list[int]) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i >= 1."""
        rows = self.logprob_matrix(tokens)
        return rows[np.arange(len(tokens) - 1), tokens[1:]]

    def loglikelihood(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """lm-eval's (sum of continuation logprobs, whether each continuation token is the argmax)."""
        tokens = context + continuation
        rows = self.logprob_matrix(tokens)[len(context) - 1: len(tokens) - 1]
        lp = rows[np.arange(len(continuation)), continuation]
        return float(lp.sum()), bool((rows.argmax(axis=1) == np.array(continuation)).all())

    def greedy(self, tokens: list[int], max_tokens: int, stop: list[str]) -> str:
        """Greedy continuation: argmax at each step, ends at an end-of-generation token or a stop string."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.llm.reset()
        self.llm.eval(tokens)
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.append(token)
            text = self.llm.detokenize(out, special=True).decode("utf-8", errors="replace")
            hits = [text.find(s) for s in stop if s and s in text]
            if hits:
                return text[: min(hits)]
            self.llm.eval([token])
        return self.llm.detokenize(out, special=True).decode("utf-8", errors="replace")
