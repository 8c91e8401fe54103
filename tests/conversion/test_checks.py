"""The greedy check and top-1 agreement count numerical ties instead of failing on them."""
from types import SimpleNamespace

import torch

from shared.conversion.checks import greedy, logit_metrics

V = 5


def step_logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)  # (N, V)


class Reference:
    def __init__(self, logits, tokens):
        self.logits, self.tokens = logits, tokens

    def generate(self, input_ids, **kwargs):
        sequences = torch.cat((input_ids, self.tokens[None]), dim=1)
        steps = tuple(row[None] for row in self.logits)
        return SimpleNamespace(sequences=sequences, logits=steps, scores=steps)


class Converted:
    """generate() continues with `generated`; a full forward gives the reference's logits plus `delta`."""

    def __init__(self, logits, delta, generated):
        self.logits, self.delta, self.generated = logits, delta, generated

    def generate(self, input_ids, **kwargs):
        return torch.cat((input_ids, self.generated[None]), dim=1)

    def __call__(self, input_ids, use_cache=False):
        T = input_ids.shape[1]
        out = torch.zeros(1, T, V)
        out[0, -len(self.logits):] = self.logits + self.delta
        return SimpleNamespace(logits=out)


REF = step_logits([0, 9, 0, 0, 0], [0, 0, 5.0, 5.0 - 1e-7, 0], [7, 0, 0, 0, 0], [0, 0, 0, 0, 3])
REF_TOKENS = torch.tensor([1, 2, 0, 4])
PROMPT = torch.tensor([[3, 3]])


def test_a_parting_at_a_tie_is_counted_not_failed():
    delta = torch.zeros(4, V)
    delta[1, 3] = 3e-7  # within the logit error: the converted model prefers token 3 at step 1
    delta[0, 0] = 2e-7
    result = greedy(Converted(REF, delta, torch.tensor([1, 3, 0, 0])), Reference(REF, REF_TOKENS), PROMPT, 4, False)
    assert result["ties"] == [1] and result["mismatches"] == [] and result["passed"]
    assert result["identical"] is False and result["first_parting"] == 1


def test_a_real_parting_fails():
    delta = torch.zeros(4, V)
    delta[2, 1] = 8.0  # step 2: the reference's margin is 7, far above the logit error
    result = greedy(Converted(REF, delta, torch.tensor([1, 2, 1, 4])), Reference(REF, REF_TOKENS), PROMPT, 4, False)
    assert result["mismatches"] == [2] and not result["passed"]


def test_top1_ties_and_mismatches():
    ref = torch.randn(12, V, generator=torch.Generator().manual_seed(0))
    ours = ref + 1e-7
    ref[10, :2], ours[10, :2] = torch.tensor([1.0, 1.0 - 1e-8]), torch.tensor([1.0, 1.0 + 1e-7])  # a tie
    ref[11, :2], ours[11, :2] = torch.tensor([9.0, 0.0]), torch.tensor([0.0, 9.0])  # a wrong answer
    metrics = logit_metrics(ours, ref)
    assert metrics["top1_ties"] == 1 and metrics["top1_mismatches"] == 1


def test_tiny_llama_with_vocabulary_131_passes_its_verdict(tmp_path):
    """The case that failed before ties were counted (2 layers, vocabulary 131, 32 greedy tokens)."""
    from shared.conversion import ConversionOptions, convert

    from .tiny import build, save

    save(build("llama", vocab_size=131), tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out", ConversionOptions(greedy_tokens=32))
    assert report.passed, (report.failures, report.greedy)
    assert report.greedy["tokens"] == 32 and not report.greedy["mismatches"]
