"""Every model type of the issue's test list, as a tiny random model built from transformers'
own config class (norm weights and biases perturbed), converted through the public API and
judged against transformers: decoders KL <= 1e-6 and top-1 100 % on two random batches and
32 greedy tokens identical (through transformers' generate()); encoders cosine >= 0.999999;
every converted model holds no FFN, and passes its own verdict with margin."""
import pytest
import torch

from shared.conversion import ConversionOptions, convert, load_converted
from shared.conversion.checks import logit_metrics
from shared.conversion.modules import GatedHeads, HeadExperts, NeuronHeads
from shared.conversion.patterns import remaining_ffns

from .tiny import build, save

CAUSAL = "AutoModelForCausalLM"
ARCHITECTURES = {  # test id -> (model_type, Auto class, config overrides)
    "gpt2": ("gpt2", CAUSAL, {}),
    "gpt_neo": ("gpt_neo", CAUSAL, dict(attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"])),
    "gptj": ("gptj", CAUSAL, {}),
    "gpt_neox": ("gpt_neox", CAUSAL, {}),
    "opt": ("opt", CAUSAL, {}),
    "bloom": ("bloom", CAUSAL, {}),
    "falcon": ("falcon", CAUSAL, {}),
    "phi": ("phi", CAUSAL, {}),
    "phi3": ("phi3", CAUSAL, {}),
    "llama": ("llama", CAUSAL, {}),
    "mistral": ("mistral", CAUSAL, {}),
    "qwen2": ("qwen2", CAUSAL, {}),
    "qwen3": ("qwen3", CAUSAL, {}),
    "gemma": ("gemma", CAUSAL, {}),
    "gemma2": ("gemma2", CAUSAL, {}),
    "gemma3_text": ("gemma3_text", CAUSAL, {}),
    "olmo": ("olmo", CAUSAL, {}),
    "olmo2": ("olmo2", CAUSAL, {}),
    "smollm3": ("smollm3", CAUSAL, {}),
    "mixtral": ("mixtral", CAUSAL, {}),
    "qwen2_moe": ("qwen2_moe", CAUSAL, {}),
    "qwen3_moe": ("qwen3_moe", CAUSAL, {}),
    "olmoe": ("olmoe", CAUSAL, {}),
    "arcee": ("arcee", CAUSAL, {}),  # squared ReLU: gate heads and product pairs on one projection
    "ctrl": ("ctrl", CAUSAL, {}),  # the FFN is an nn.Sequential
    "mpt": ("mpt", CAUSAL, {}),
    "lfm2": ("lfm2", CAUSAL, {}),  # F.silu inline: the verification finds the activation
    "openai-gpt": ("openai-gpt", CAUSAL, {}),  # gelu kept as a function attribute: wrapped as a module
    "bart-decoder": ("bart", CAUSAL, {}),  # a causal LM built from an encoder-decoder's config
    "bert": ("bert", "AutoModel", {}),
    "roberta": ("roberta", "AutoModel", {}),
    "xlm-roberta": ("xlm-roberta", "AutoModel", {}),
    "distilbert": ("distilbert", "AutoModel", {}),
    "modernbert": ("modernbert", "AutoModel", {}),
    "t5-relu": ("t5", "AutoModelForSeq2SeqLM", {}),
    "t5-gated-gelu": ("t5", "AutoModelForSeq2SeqLM", dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                                                           is_gated_act=True)),
}
TOLERANCE = 1e-5


def outputs(model, ids, encoder_decoder):
    with torch.no_grad():
        if encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        out = model(input_ids=ids)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_converts_and_matches_transformers(name, tmp_path):
    model_type, auto, overrides = ARCHITECTURES[name]
    source = build(model_type, auto, **overrides)
    save(source, tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out",
                     ConversionOptions(tolerance=TOLERANCE, calibration_tokens=128, seq_len=32, greedy_tokens=32))
    assert report.passed, report.failures
    assert max(e["ffn_rel"] for e in report.local) <= 0.5 * TOLERANCE, report.local

    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "attention-only" in card and "passed" in card

    converted = load_converted(tmp_path / "out")
    assert type(converted) is type(source)
    assert remaining_ffns(converted) == [], "an FFN was left in place"
    heads = [m for m in converted.modules() if isinstance(m, (NeuronHeads, GatedHeads, HeadExperts))]
    assert len(heads) >= len(report.local) == len(report.config["attention_only"]["sites"]) > 0

    encoder_decoder = source.config.is_encoder_decoder
    for seed in (1, 2):
        ids = torch.randint(0, source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
        ours, ref = outputs(converted, ids, encoder_decoder), outputs(source, ids, encoder_decoder)
        if auto == "AutoModel":
            cosine = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
            assert cosine.min() >= 0.999999
        else:
            metrics = logit_metrics(ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1]))
            assert metrics["kl_max"] <= 1e-6 and metrics["top1_agreement"] == 1.0, metrics
    if auto != "AutoModel":
        assert report.greedy["identical"] and report.greedy["tokens"] == 32, report.greedy


def test_generate_keeps_no_state_between_calls(tmp_path):
    """Two unrelated prompts generated one after the other give what fresh models give."""
    source = build("llama", CAUSAL)
    save(source, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", ConversionOptions(calibration_tokens=64, seq_len=16, checks=[]))
    converted = load_converted(tmp_path / "out")
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for prompt in ([[5, 17, 42, 3]], [[60, 2, 9]], [[5, 17, 42, 3]]):
        ids = torch.tensor(prompt)
        expected = source.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        assert torch.equal(converted.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs), expected)


def test_sampling_generate_runs(tmp_path):
    source = build("gpt2", CAUSAL)
    save(source, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", ConversionOptions(calibration_tokens=64, seq_len=16, checks=[]))
    converted = load_converted(tmp_path / "out")
    ids = torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)
    ours = converted.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=12,
                              min_new_tokens=12, pad_token_id=0)
    torch.manual_seed(0)
    ref = source.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=12,
                          min_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_auto_classes_load_the_converted_directory(tmp_path):
    """transformers' Auto classes (trust_remote_code) hand the directory to load_converted."""
    from transformers import AutoModelForCausalLM

    source = build("qwen2", CAUSAL)
    save(source, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", ConversionOptions(calibration_tokens=64, seq_len=16, checks=[]))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert remaining_ffns(model) == [] and model.attention_only["format_version"] == 2
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-4)
