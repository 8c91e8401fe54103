"""BERT encoders: post-LayerNorm, bidirectional attention, token-type embeddings, exact GELU."""
from ..errors import UnsupportedArchitectureError
from .common import activation_name, require, strip_prefix

FAMILY = "bert"
ARCHITECTURES = ("BertModel",)
MODEL_TYPES = ("bert",)


def describe(config: dict) -> dict:
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError("BERT with relative position embeddings is not supported")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise UnsupportedArchitectureError("BERT as a decoder is not supported; BertModel encoders are")
    D = require(config, "hidden_size")
    n_heads = require(config, "num_attention_heads")
    if D % n_heads:
        raise UnsupportedArchitectureError(f"hidden_size={D} is not divisible by num_attention_heads={n_heads}")
    return {
        "family": FAMILY,
        "source_architecture": (config.get("architectures") or ["BertModel"])[0],
        "kind": "encoder",
        "placement": "post",
        "d_model": D,
        "vocab_size": require(config, "vocab_size"),
        "n_layers": require(config, "num_hidden_layers"),
        "max_positions": require(config, "max_position_embeddings"),
        "norm": {"kind": "layernorm", "eps": float(config.get("layer_norm_eps", 1e-12))},
        "embedding": {"positions": "learned", "token_types": config.get("type_vocab_size", 2), "norm": True},
        "attention": {
            "n_heads": n_heads, "n_kv_heads": n_heads, "head_dim": D // n_heads,
            "bias_qkv": True, "bias_o": True, "scale": (D // n_heads) ** -0.5,
            "scale_by_inverse_layer_idx": False, "rotary": None, "sliding_window": None,
        },
        "ffn": {"kind": "plain", "bias": True, "activation": activation_name(config.get("hidden_act", "gelu")),
                "width": require(config, "intermediate_size")},
        "final_norm": False,
        "lm_head": "none",
    }


def detect_prefix(names) -> str:
    return strip_prefix(names, ("bert.",))


def tensor_sources(arch: dict, prefix: str) -> dict:
    e = prefix + "embeddings."
    sources = {
        "embed.tokens": e + "word_embeddings.weight",
        "embed.positions": e + "position_embeddings.weight",
        "embed.token_types": e + "token_type_embeddings.weight",
        "embed.norm.weight": e + "LayerNorm.weight",
        "embed.norm.bias": e + "LayerNorm.bias",
    }
    for i in range(arch["n_layers"]):
        hf, p = f"{prefix}encoder.layer.{i}.", f"layers.{i}."
        for part, name in (("q", "query"), ("k", "key"), ("v", "value")):
            sources[f"{p}attn.{part}.weight"] = f"{hf}attention.self.{name}.weight"
            sources[f"{p}attn.{part}.bias"] = f"{hf}attention.self.{name}.bias"
        sources[p + "attn.o.weight"] = hf + "attention.output.dense.weight"
        sources[p + "attn.o.bias"] = hf + "attention.output.dense.bias"
        sources[p + "attn_norm.weight"] = hf + "attention.output.LayerNorm.weight"
        sources[p + "attn_norm.bias"] = hf + "attention.output.LayerNorm.bias"
        sources[p + "ffn.w1.weight"] = hf + "intermediate.dense.weight"
        sources[p + "ffn.w1.bias"] = hf + "intermediate.dense.bias"
        sources[p + "ffn.w2.weight"] = hf + "output.dense.weight"
        sources[p + "ffn.w2.bias"] = hf + "output.dense.bias"
        sources[p + "ffn_norm.weight"] = hf + "output.LayerNorm.weight"
        sources[p + "ffn_norm.bias"] = hf + "output.LayerNorm.bias"
    return {name: (hf, lambda t: t) for name, hf in sources.items()}
