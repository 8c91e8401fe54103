"""LLaMA family (LLaMA, Mistral, Qwen2): pre-RMSNorm decoder, rotary positions,
grouped-query attention, gated FFN (SwiGLU; GeGLU when hidden_act says gelu)."""
from ..errors import UnsupportedArchitectureError
from .common import activation_name, require, strip_prefix

FAMILY = "llama"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


def rotary_parameters(config: dict) -> dict:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedArchitectureError("partial rotary embeddings are not supported")
    rotary = {"type": rope_type, "theta": float(params["rope_theta"])}
    if rope_type in ("linear", "llama3"):
        rotary["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            rotary[key] = float(params[key])
    return rotary


def sliding_window(config: dict):
    model_type = config.get("model_type")
    if model_type == "qwen2":
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise UnsupportedArchitectureError("Qwen2 with sliding-window layers is not supported")
        return None
    if model_type == "mistral":
        return config.get("sliding_window")
    return None


def describe(config: dict) -> dict:
    D = require(config, "hidden_size")
    n_heads = require(config, "num_attention_heads")
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or D // n_heads
    if n_heads % n_kv_heads:
        raise UnsupportedArchitectureError(f"{n_heads} heads cannot share {n_kv_heads} key/value heads")
    model_type = config.get("model_type", "llama")
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    return {
        "family": FAMILY,
        "source_architecture": (config.get("architectures") or ["LlamaForCausalLM"])[0],
        "kind": "decoder",
        "placement": "pre",
        "d_model": D,
        "vocab_size": require(config, "vocab_size"),
        "n_layers": require(config, "num_hidden_layers"),
        "max_positions": require(config, "max_position_embeddings"),
        "norm": {"kind": "rmsnorm", "eps": float(config.get("rms_norm_eps", 1e-6))},
        "embedding": {"positions": "none", "token_types": 0, "norm": False},
        "attention": {
            "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
            "bias_qkv": qkv_bias, "bias_o": model_type != "qwen2" and bool(config.get("attention_bias", False)),
            "scale": head_dim**-0.5, "scale_by_inverse_layer_idx": False,
            "rotary": rotary_parameters(config), "sliding_window": sliding_window(config),
        },
        "ffn": {
            "kind": "gated", "bias": bool(config.get("mlp_bias", False)),
            "activation": activation_name(config.get("hidden_act", "silu")),
            "width": require(config, "intermediate_size"),
        },
        "final_norm": True,
        "lm_head": "tied" if config.get("tie_word_embeddings", False) else "separate",
    }


def detect_prefix(names) -> str:
    return strip_prefix(names, ("model.",))


def tensor_sources(arch: dict, prefix: str) -> dict:
    sources = {"embed.tokens": prefix + "embed_tokens.weight"}
    att, ffn = arch["attention"], arch["ffn"]
    for i in range(arch["n_layers"]):
        hf, p = f"{prefix}layers.{i}.", f"layers.{i}."
        sources[p + "attn_norm.weight"] = hf + "input_layernorm.weight"
        sources[p + "ffn_norm.weight"] = hf + "post_attention_layernorm.weight"
        for part in "qkvo":
            sources[f"{p}attn.{part}.weight"] = f"{hf}self_attn.{part}_proj.weight"
        if att["bias_qkv"]:
            for part in "qkv":
                sources[f"{p}attn.{part}.bias"] = f"{hf}self_attn.{part}_proj.bias"
        if att["bias_o"]:
            sources[p + "attn.o.bias"] = hf + "self_attn.o_proj.bias"
        for part in ("gate", "up", "down"):
            sources[f"{p}ffn.{part}.weight"] = f"{hf}mlp.{part}_proj.weight"
            if ffn["bias"]:
                sources[f"{p}ffn.{part}.bias"] = f"{hf}mlp.{part}_proj.bias"
    sources["final_norm.weight"] = prefix + "norm.weight"
    if arch["lm_head"] == "separate":
        sources["lm_head.weight"] = "lm_head.weight"
    return {name: (hf, lambda t: t) for name, hf in sources.items()}
