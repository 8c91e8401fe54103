"""Tiny random models of any transformers model type: its default config shrunk field by field,
built with random weights (norm weights and biases perturbed so they matter) and saved as a
real Hugging Face directory. Used by the architecture tests and bench/architectures.py."""
import torch
import transformers

# field -> tiny value, applied where the config has the field
SHRINK = {
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "dim": 32, "hidden_dim": 64,
    "intermediate_size": 64, "n_inner": 64, "ffn_dim": 64, "d_ff": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "intermediate_size_mlp": 64,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "decoder_attention_heads": 4,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "d_kv": 8, "kv_channels": 8,
    "vocab_size": 97, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "n_routed_experts": 4,
    "sliding_window": 16, "attention_window": 16, "rotary_dim": 4, "partial_rotary_factor": 0.5,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0,
    "query_pre_attn_scalar": 8, "global_attn_every_n_layers": 2, "local_attention": 16,
}


def tiny_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in {**SHRINK, **overrides}.items():
        if key in overrides or getattr(config, key, None) is not None:
            try:
                setattr(config, key, value)
            except AttributeError:  # a derived property (e.g. Falcon's head_dim)
                pass
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(getattr(config, "layer_types", None), list) and layers:
        config.layer_types = (config.layer_types * layers)[:layers]
    if getattr(config, "num_key_value_heads", None) and config.num_attention_heads % config.num_key_value_heads:
        config.num_key_value_heads = config.num_attention_heads
    return config


def perturb_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights around 1 and biases around 0 that are not exactly 1 and 0."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" not in type(module).__name__.lower() and "layernorm" not in name.lower():
                continue
            for pname, param in module.named_parameters(recurse=False):
                noise = 0.1 * torch.randn(param.shape, generator=generator)
                param.add_(noise.to(param.dtype))


def build(model_type: str, auto: str = "AutoModelForCausalLM", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = getattr(transformers, auto).from_config(config).eval()
    perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def save(model, directory):
    model.save_pretrained(directory)
    return directory
