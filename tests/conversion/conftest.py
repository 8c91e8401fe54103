"""Tiny random-weight models of every supported family, saved as real Hugging Face
directories with transformers' own config classes and save_pretrained."""
import pytest
import torch
import transformers

FAMILIES = {
    "gpt2-gelu_new": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, activation_function="gelu_new")),
    "gpt2-relu": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, activation_function="relu")),
    "gpt2-gelu": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, activation_function="gelu")),
    "gpt2-headless": ("GPT2Config", "GPT2Model", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)),
    "gpt2-silu": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, activation_function="silu")),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1, vocab_size=97, max_position_embeddings=128, tie_word_embeddings=True)),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, vocab_size=97, max_position_embeddings=128, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)),
    "bert": ("BertConfig", "BertModel", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=97, max_position_embeddings=64)),
}
GATED = {"llama-gqa", "llama-tied", "llama-rope-llama3", "llama-rope-linear", "mistral", "qwen2"}


def build_model(name: str, seed: int = 0):
    config_cls, model_cls, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    if name == "qwen2":  # Qwen2 initialises its q/k/v biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def save_model(model, directory):
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def source_dirs(tmp_path_factory):
    """name -> saved HF directory, built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_model(build_model(name), tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def fast_options():
    """Small calibration and check sizes: the tests run dozens of conversions."""
    from shared.conversion import ConversionOptions

    def make(**overrides):
        values = dict(calibration_tokens=128, seq_len=32, greedy_tokens=32)
        values.update(overrides)
        return ConversionOptions(**values)

    return make
