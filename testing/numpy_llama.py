"""A float64 numpy forward pass of a Hugging Face-layout llama model: the oracle both backends answer to.

Written from the architecture's definition (RMSNorm, rotary embeddings in the rotate-half form,
grouped-query causal attention, SwiGLU), sharing nothing with llama.cpp or MLX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from testing.oracle import log_softmax64


class NumpyLlama:
    def __init__(self, folder: Path):
        from safetensors.numpy import load_file

        self.config = json.loads((Path(folder) / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}

    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.config["rms_norm_eps"]) * weight

    def _rope(self, x: np.ndarray) -> np.ndarray:
        """x: [n, heads, head_dim], rotated by position in HF's rotate-half layout."""
        n, _, head_dim = x.shape
        inv_freq = 1.0 / self.config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        angles = np.arange(n)[:, None] * inv_freq[None, :]
        cos = np.cos(np.concatenate([angles, angles], axis=-1))[:, None, :]
        sin = np.sin(np.concatenate([angles, angles], axis=-1))[:, None, :]
        half = head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def logits(self, tokens: list[int]) -> np.ndarray:
        c, w = self.config, self.w
        n, heads, kv_heads, head_dim = len(tokens), c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        x = w["model.embed_tokens.weight"][tokens]
        causal = np.triu(np.full((n, n), -np.inf), k=1)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._rms_norm(x, w[p + "input_layernorm.weight"])
            q = self._rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, head_dim))
            k = self._rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, head_dim))
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, head_dim)
            k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + causal
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", scores, v).reshape(n, heads * head_dim)
            x = x + attn @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms_norm(x, w[p + "post_attention_layernorm.weight"])
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        x = self._rms_norm(x, w["model.norm.weight"])
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return x @ head.T

    def logprob_matrix(self, tokens: list[int]) -> np.ndarray:
        """[n, vocab]: row i is log p(. | tokens[:i+1])."""
        return log_softmax64(self.logits(tokens))
