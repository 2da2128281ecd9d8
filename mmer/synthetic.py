"""The config.json and tensor shapes of a plain Llama causal LM, for models written tensor by tensor.

The test fixtures, ``examples/add_and_tune/gap_table.py`` and the benchmarks build their models this way, with
seeded tensors and no transformers model class, at sizes of their own; what makes each of them a Llama (the
architecture keys, the norm epsilon, the RoPE base, an untied head, the order tensors are written in) is
written here once. ``TINY_LLAMA`` is the smallest such model that still has grouped-query attention and more
than one layer: the suite's fixtures and the gap table use it, so the example measures the models the tests pin.
"""

from __future__ import annotations


def llama_config(
    *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, max_positions: int, **extra
) -> dict[str, object]:
    """``extra`` adds keys a caller's files need (for example ``torch_dtype``) after the Llama ones."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
        **extra,
    }


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor in file order (embeddings, layers 0…N-1, final norm, lm_head): seeded fixtures depend on it."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


TINY_LLAMA = llama_config(hidden=16, intermediate=32, layers=2, heads=4, kv_heads=2, vocab=40, max_positions=64)
