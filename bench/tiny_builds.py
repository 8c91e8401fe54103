"""Tiny random models of any causal-LM model type transformers maps, for the architecture sweep
(bench/architectures.py): tests/conversion/tiny.py's default config shrunk field by field, its
sub-configs (text_config, vision_config, ...) shrunk the same way here, plus the per-type
OVERRIDES below; a model is first built on the meta device and refused when it has more than
max_params parameters (a full-size default config would take minutes and gigabytes)."""


# multi-head latent attention (deepseek_v2/v3 and relatives): the latent and per-head widths
# tiny.SHRINK does not name, consistent with head_dim 8; keys and values have as many heads as queries
MLA = {"num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
       "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 8, "head_dim": 8}
MLA_INDEXER = {**MLA, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8}

# BART-style decoders: layer counts and widths under their own names (tiny.SHRINK's
# num_hidden_layers is an alias of encoder_layers there, so the decoder kept its default depth)
SEQ2SEQ_DECODER = {"encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                   "encoder_attention_heads": 4, "decoder_attention_heads": 4}
# hybrids whose first two default layers are both linear attention / SSM: transformers cannot
# build a causal mask without one attention layer, so keep one of each
HYBRID = {"layer_types": ["linear_attention", "full_attention"]}
QWEN4_EXP = {"layer_types": ["linear_attention", "indexed_attention"], "indexer_n_heads": 2, "indexer_kv_heads": 1,
             "indexer_head_dim": 8, "indexer_budget": 16, "indexer_compress_ratio": 4}

# model_type -> config fields set on top of tiny.SHRINK (top level). Data only: what a type's
# config needs so that its tiny version is consistent. A dict value under a sub-config's name
# ("text_config", ...) is applied to that sub-config.
OVERRIDES = {
    # per-layer lists derived from a count (only the constructor re-derives them)
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "attention_layers": ["global", "local"],
                "num_layers": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "gemma3n_text": {"num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"],
                     "vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8, "laurel_rank": 8},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # defaults that are None where the model needs a number
    "hunyuan_v1_dense": {"head_dim": 8},
    "hunyuan_v1_moe": {"head_dim": 8},
    "ministral": {"head_dim": 8},
    "nemotron": {"num_key_value_heads": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # clip_qkv None fails in torch.clamp
    "zaya": {"num_experts_per_tok": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "lsh"], "axial_pos_shape": (8, 16),
                 "axial_pos_embds_dim": (16, 16), "local_attn_chunk_length": 16, "lsh_attn_chunk_length": 16,
                 "num_buckets": 4},
    # widths tiny.SHRINK does not name
    "cpmant": {"dim_ff": 64, "dim_head": 8},
    "granitemoehybrid": {**HYBRID, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                         "mamba_chunk_size": 16},
    "mamba2": {"head_dim": 16, "n_groups": 1, "state_size": 16, "chunk_size": 16},
    **{t: SEQ2SEQ_DECODER for t in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart",
                                     "mvp", "pegasus", "plbart", "whisper")},
    **{t: HYBRID for t in ("qwen3_next", "olmo_hybrid", "qwen3_5_text", "qwen3_5_moe_text")},
    **{t: {"text_config": HYBRID} for t in ("qwen3_5", "qwen3_5_moe")},
    "qwen4_exp_text": QWEN4_EXP,
    "qwen4_exp": {"text_config": QWEN4_EXP},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32, "attention_window_size": 16},
    "glm4_moe_lite": MLA,
    "minicpm3": MLA,
    "youtu": MLA,
    "rwkv": {"attention_hidden_size": 32},
    # the cache rounds qk/v widths up to multiples of 64 and the layers do not: widths where both agree
    "xlstm": {"embedding_dim": 128, "hidden_size": 128, "num_blocks": 2, "num_heads": 4},
    "hrm_text": {"num_layers_per_stack": 1},
    "xmod": {"default_language": "en_XX"},
    "bailing_hybrid": {**HYBRID, **MLA},
    "kimi_linear": {**HYBRID, **MLA, "linear_head_dim": 8, "linear_num_heads": 4,
                    "num_experts_per_token": 2},
    # zamba: with one hybrid layer transformers' tie_weights_keys for the shared block fails; use two
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
              "attention_hidden_size": 64, "attention_head_dim": 16, "mamba_dt_rank": 4, "use_mamba_kernels": False},
    "zamba2": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
               "hybrid_layer_ids": [1, 2], "attention_hidden_size": 64, "attention_head_dim": 16, "mamba_headdim": 16,
               "n_mamba_heads": 4, "mamba_d_state": 16, "adapter_rank": 8, "use_mamba_kernels": False},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
              "mamba_chunk_size": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "roc_bert": {"shape_vocab_size": 97, "shape_embed_dim": 16, "pronunciation_vocab_size": 97,
                 "pronunciation_embed_dim": 16},
    "deepseek_v2": {**MLA, "num_experts_per_tok": 2},
    "deepseek_v3": MLA,
    "sarvam_mla": MLA,
    "axk1": {**MLA, "n_group": 1, "topk_group": 1},
    "axk2": MLA_INDEXER,
    "deepseek_v32": MLA_INDEXER,
    "glm_moe_dsa": MLA_INDEXER,
    "hy_v4": MLA_INDEXER,
    "longcat_flash": {**MLA, "expert_ffn_hidden_size": 32, "n_routed_experts": 4, "zero_expert_num": 2},
    "inkling2_text": {"unpadded_vocab_size": 97, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                      "swa_head_dim": 8},
    "inkling2_loop_text": {"unpadded_vocab_size": 97, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                           "swa_head_dim": 8},
    "gemma4_text": {"vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8, "per_layer_config": {}},
    "gemma4": {"text_config": {"vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8,
                               "per_layer_config": {}}},
    # the composite config derives the global transformer's input width (encoder width x cross_attn_k)
    # in its constructor only: the shrunk value, so that the saved config rebuilds the same model
    "blt": {"encoder_hash_byte_group_vocab": 101, "encoder_config": {"hidden_size_global": 32},
            "decoder_config": {"hidden_size_global": 32}, "global_config": {"encoder_cross_output_size": 64}},
}

# sub-config fields that tiny.SHRINK does not name but that must shrink with it
NESTED_SHRINK = {"vocab_size": 97, "intermediate_size": 64, "hidden_size": 32}


def _get(obj, key):
    """getattr that also treats a config's refusal to answer (a per-layer attribute) as None."""
    try:
        return getattr(obj, key, None)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError
        return None


def _shrink_sub_configs(config, shrink: dict, overrides: dict) -> None:
    """tiny_config shrinks the top level only: shrink each sub-config (text_config, vision_config,
    ...) with the same table, where the sub-config has the field."""
    names = list(getattr(config, "sub_configs", {}) or {})
    for name in names:
        sub = getattr(config, name, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        for key, value in {**shrink, **(overrides.get(name) or {})}.items():
            if key in (overrides.get(name) or {}) or _get(sub, key) is not None:
                try:
                    setattr(sub, key, value)
                except AttributeError:
                    pass
        layers = _get(sub, "num_hidden_layers")
        if isinstance(_get(sub, "layer_types"), list) and layers:
            try:
                sub.layer_types = (sub.layer_types * layers)[:layers]
            except AttributeError:
                pass
        kv, heads = _get(sub, "num_key_value_heads"), _get(sub, "num_attention_heads")
        if isinstance(kv, int) and isinstance(heads, int) and kv and heads % kv:
            sub.num_key_value_heads = heads
        _shrink_sub_configs(sub, shrink, overrides.get(name) or {})


def _init_config(model_type: str, shrink: dict, **overrides):
    """The tiny config through the config class' constructor (tiny.SHRINK's fields that the
    default config sets, plus overrides), so fields the constructor derives from others
    (layer lists, block types) follow them: the fallback when tiny.tiny_config's field-by-field
    setattr leaves a config inconsistent."""
    import transformers

    try:
        fields = transformers.AutoConfig.for_model(model_type).to_dict()
    except Exception:  # noqa: BLE001 - a default config that does not validate without the overrides
        fields = transformers.AutoConfig.for_model(model_type, **overrides).to_dict()
    kwargs = {k: v for k, v in shrink.items() if fields.get(k) is not None}
    config = transformers.AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    kv, heads = _get(config, "num_key_value_heads"), _get(config, "num_attention_heads")
    if isinstance(kv, int) and isinstance(heads, int) and kv and heads % kv:
        config.num_key_value_heads = heads
    return config


def tiny_configs(model_type: str):
    """(strategy, config) candidates in order: tiny.tiny_config, then the constructor."""
    from tests.conversion import tiny

    import transformers

    overrides = dict(OVERRIDES.get(model_type, {}))
    sub_configs = getattr(transformers.CONFIG_MAPPING[model_type], "sub_configs", {}) or {}
    nested = {k: v for k, v in overrides.items() if k in sub_configs and isinstance(v, dict)}
    flat = {k: v for k, v in overrides.items() if k not in nested}
    for strategy, make in (("tiny", lambda: tiny.tiny_config(model_type, **flat)),
                           ("init", lambda: _init_config(model_type, tiny.SHRINK, **flat))):
        def candidate(make=make):
            config = make()
            _shrink_sub_configs(config, {**tiny.SHRINK, **NESTED_SHRINK}, nested)
            return config
        yield strategy, candidate


def build_tiny(model_type: str, max_params: int, meta_only: bool = False):
    """A tiny random model of model_type: the first config strategy whose model builds (on the
    meta device), validates and stays under max_params; then built for real, norms perturbed
    (tiny.perturb_norms). Raises the last strategy's error, with every strategy's in .errors."""
    import torch
    import transformers

    from tests.conversion import tiny

    errors = {}
    for strategy, candidate in tiny_configs(model_type):
        try:
            config = candidate()
            with torch.device("meta"):
                shape = transformers.AutoModelForCausalLM.from_config(config)
            params = sum(p.numel() for p in shape.parameters())
            if params > max_params:
                biggest = sorted(((p.numel(), n) for n, p in shape.named_parameters()), reverse=True)[:3]
                raise BuildTooBig(f"not shrunk: {params / 1e6:.1f}M parameters (largest: " + ", ".join(
                    f"{n} {tuple(shape.get_parameter(n).shape)}" for _, n in biggest) + ")")
            if hasattr(config, "validate"):
                config.validate()
            del shape
            break
        except Exception as exc:  # noqa: BLE001 - try the next strategy
            errors[strategy] = exc
    else:
        exc = list(errors.values())[-1]
        exc.errors = {k: f"{type(e).__name__}: {first_line(e)}" for k, e in errors.items()}
        raise exc
    if meta_only:
        return None, params, strategy
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tiny.perturb_norms(model, torch.Generator().manual_seed(1))
    return model, params, strategy


class BuildTooBig(Exception):
    pass


def first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
