"""A small model with the same float32 weights in both formats: a GGUF file and an mlx-lm folder.

It is SmolLM2-135M cut to its first two transformer blocks (or any number, up to all 30: the bench's
float32 model for lm-eval's `hf` model): the default model's Q4_1/Q8_0 weights
are dequantized to float32 (so real embeddings and a real tokenizer, with peaked distributions),
then written once as an F32 GGUF file and once as a Hugging Face-layout folder (config.json,
model.safetensors, tokenizer.json). Both are cached; creation takes a few seconds.

SmolLM2's tokenizer adds no BOS. The `add_bos=True` variant has the same weights and a tokenizer
that puts BOS_TOKEN first when tokenizing with special tokens, as Gemma 3's and Llama's do: in the
GGUF file through `tokenizer.ggml.add_bos_token`, in the folder through tokenizer.json's
post-processor (and `add_bos_token` in tokenizer_config.json).

    python -m tests.fixture_model [CACHE_DIR]     # prints the paths: plain pair, then BOS pair
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

N_LAYERS = 2
WHOLE = 30  # SmolLM2-135M's blocks: n_layers=WHOLE is the model whole, in float32
VERSION = "v1"
TOKEN_TYPE_CONTROL = 3
# The BOS-adding variant's BOS: SmolLM2's <|endoftext|> (id 0), a control token that the chat
# template does not use, like Llama's <|begin_of_text|>.
BOS_TOKEN = "<|endoftext|>"


def _field_value(field):
    return field.contents()


def _hf_order(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GGUF interleaves rotary pairs; HF uses halves)."""
    out_dim = weight.shape[0]
    return weight.reshape(n_heads, out_dim // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(reader, tensors: dict[str, np.ndarray], path: Path, bos_id: int | None, n_layers: int) -> None:
    """bos_id: None keeps the source's BOS rules; an id makes it the BOS, added when tokenizing."""
    from gguf import GGUFValueType, GGUFWriter

    skip = {"general.architecture", "general.file_type", "llama.block_count"}
    if bos_id is not None:
        skip |= {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token"}
    writer = GGUFWriter(str(path), arch="llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, _field_value(field), vtype, sub_type=sub_type)
    writer.add_block_count(n_layers)
    writer.add_file_type(0)  # ALL_F32
    if bos_id is not None:
        writer.add_bos_token_id(bos_id)
        writer.add_add_bos_token(True)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hf_folder(reader, tensors: dict[str, np.ndarray], folder: Path, bos_id: int | None, n_layers: int) -> None:
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    meta = {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    weights = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
    }
    names = {
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q": "self_attn.q_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(n_layers):
        for short, long in names.items():
            w = tensors[f"blk.{i}.{short}.weight"]
            if short == "attn_q":
                w = _hf_order(w, n_heads)
            elif short == "attn_k":
                w = _hf_order(w, n_kv)
            weights[f"model.layers.{i}.{long}.weight"] = w
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    add_bos = bos_id is not None
    if not add_bos:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
    bos, eos = tokens[bos_id], tokens[meta["tokenizer.ggml.eos_token_id"]]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": n_layers,
        "head_dim": meta["llama.rope.dimension_count"],
        "hidden_act": "silu",
        "rms_norm_eps": float(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])),
        # Top-level rope_theta on purpose: without it mlx-lm silently uses 10000.
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": len(tokens),
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    # The same byte-level BPE as the GGUF (SmolLM2's "smollm" pre-tokenizer: digits split one by one).
    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL]
    )
    if add_bos:  # as Llama's tokenizer.json: BOS before each sequence when special tokens are added
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": eos,
                "add_bos_token": add_bos,
                "add_eos_token": False,
                "model_max_length": meta["llama.context_length"],
                "chat_template": meta.get("tokenizer.chat_template"),
            },
            indent=2,
        )
    )


def make_fixture(
    source_gguf: Path, cache_dir: Path, add_bos: bool = False, n_layers: int = N_LAYERS
) -> tuple[Path, Path]:
    """(GGUF file, mlx-lm folder) of the float32 model, created once. add_bos: the variant whose
    tokenizer adds BOS_TOKEN when tokenizing with special tokens; n_layers: keep that many blocks
    (two by default; WHOLE: all; the folder is also what transformers loads)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    root = cache_dir / f"smollm2-{n_layers}block-f32{'-bos' if add_bos else ''}-{VERSION}"
    gguf_path, mlx_dir = root / "model-f32.gguf", root / "mlx"
    if (root / "done").exists():
        return gguf_path, mlx_dir
    root.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(source_gguf))
    bos_id = list(_field_value(reader.fields["tokenizer.ggml.tokens"])).index(BOS_TOKEN) if add_bos else None
    keep = ("token_embd.", "output_norm.", *tuple(f"blk.{i}." for i in range(n_layers)))
    tensors = {
        t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        for t in reader.tensors
        if t.name.startswith(keep)
    }
    _write_gguf(reader, tensors, gguf_path, bos_id, n_layers)
    _write_hf_folder(reader, tensors, mlx_dir, bos_id, n_layers)
    (root / "done").write_text("ok")
    return gguf_path, mlx_dir


def quantize(source: Path, target: Path, ftype: str) -> Path:
    """`source` quantized (or requantized) by llama.cpp to `ftype` (e.g. "Q8_0", "Q3_K_M") at
    `target`, made once: a partial file is renamed only when complete."""
    import llama_cpp

    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), True
        partial = target.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")
        partial.rename(target)
    return target


def write_split(source: Path, target: Path, parts: int = 2) -> list[Path]:
    """The GGUF file `source` split into `parts` files as llama.cpp's gguf-split names them
    (target's stem + -00001-of-0000N.gguf, ...): the same metadata and tensors, the tensors shared
    out in order. Returns the files, first part first."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    per_part = -(-len(reader.tensors) // parts)
    writer = GGUFWriter(
        str(target), arch=str(_field_value(reader.fields["general.architecture"])), split_max_tensors=per_part
    )
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(
            key, _field_value(field), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None
        )
    for tensor in reader.tensors:
        writer.add_tensor(
            tensor.name,
            np.array(tensor.data).reshape([int(d) for d in reversed(tensor.shape)]),
            raw_dtype=tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [target.with_name(f"{target.stem}-{i:05d}-of-{parts:05d}.gguf") for i in range(1, parts + 1)]


if __name__ == "__main__":
    from server.config import Settings
    from server.models.default_model import ensure_default_model

    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Settings().cache_path() / "fixtures"
    source = ensure_default_model(Settings().cache_path())
    print(*make_fixture(source, cache), *make_fixture(source, cache, add_bos=True), sep="\n")
