"""GPT-2: pre-LayerNorm decoder, learned positions, Conv1D weights stored (in, out)."""
from ..errors import UnsupportedArchitectureError
from .common import activation_name, columns, require, strip_prefix, transpose

FAMILY = "gpt2"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
MODEL_TYPES = ("gpt2",)


def describe(config: dict) -> dict:
    if config.get("add_cross_attention"):
        raise UnsupportedArchitectureError("GPT-2 with cross-attention is not supported")
    D = require(config, "n_embd", "hidden_size")
    n_heads = require(config, "n_head", "num_attention_heads")
    if D % n_heads:
        raise UnsupportedArchitectureError(f"n_embd={D} is not divisible by n_head={n_heads}")
    head_dim = D // n_heads
    architecture = (config.get("architectures") or ["GPT2LMHeadModel"])[0]
    return {
        "family": FAMILY,
        "source_architecture": architecture,
        "kind": "decoder",
        "placement": "pre",
        "d_model": D,
        "vocab_size": require(config, "vocab_size"),
        "n_layers": require(config, "n_layer", "num_hidden_layers"),
        "max_positions": require(config, "n_positions", "max_position_embeddings"),
        "norm": {"kind": "layernorm", "eps": float(config.get("layer_norm_epsilon", 1e-5))},
        "embedding": {"positions": "learned", "token_types": 0, "norm": False},
        "attention": {
            "n_heads": n_heads, "n_kv_heads": n_heads, "head_dim": head_dim,
            "bias_qkv": True, "bias_o": True,
            "scale": head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0,
            "scale_by_inverse_layer_idx": bool(config.get("scale_attn_by_inverse_layer_idx", False)),
            "rotary": None, "sliding_window": None,
        },
        "ffn": {
            "kind": "plain", "bias": True,
            "activation": activation_name(config.get("activation_function", "gelu_new")),
            "width": config.get("n_inner") or 4 * D,
        },
        "final_norm": True,
        "lm_head": "tied" if architecture == "GPT2LMHeadModel" else "none",
    }


def detect_prefix(names) -> str:
    return strip_prefix(names, ("transformer.",))


def tensor_sources(arch: dict, prefix: str) -> dict:
    D = arch["d_model"]
    sources = {"embed.tokens": (prefix + "wte.weight", None), "embed.positions": (prefix + "wpe.weight", None)}
    for i in range(arch["n_layers"]):
        hf, p = f"{prefix}h.{i}.", f"layers.{i}."
        for norm, ln in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            sources[f"{p}{norm}.weight"] = (f"{hf}{ln}.weight", None)
            sources[f"{p}{norm}.bias"] = (f"{hf}{ln}.bias", None)
        # c_attn packs q, k, v side by side along its output (second) axis
        for j, part in enumerate("qkv"):
            sources[f"{p}attn.{part}.weight"] = (hf + "attn.c_attn.weight", columns(j * D, (j + 1) * D, transpose))
            sources[f"{p}attn.{part}.bias"] = (hf + "attn.c_attn.bias", lambda t, j=j: t[j * D:(j + 1) * D])
        sources[p + "attn.o.weight"] = (hf + "attn.c_proj.weight", transpose)
        sources[p + "attn.o.bias"] = (hf + "attn.c_proj.bias", None)
        sources[p + "ffn.w1.weight"] = (hf + "mlp.c_fc.weight", transpose)
        sources[p + "ffn.w1.bias"] = (hf + "mlp.c_fc.bias", None)
        sources[p + "ffn.w2.weight"] = (hf + "mlp.c_proj.weight", transpose)
        sources[p + "ffn.w2.bias"] = (hf + "mlp.c_proj.bias", None)
    sources["final_norm.weight"] = (prefix + "ln_f.weight", None)
    sources["final_norm.bias"] = (prefix + "ln_f.bias", None)
    return {name: (hf, fn or (lambda t: t)) for name, (hf, fn) in sources.items()}
