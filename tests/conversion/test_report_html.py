"""report.html: real reports (a tiny LLaMA, a tiny BERT) render as self-contained pages."""
import copy
import re

import pytest

from shared.conversion import convert
from shared.conversion.report_html import render

SMALL = dict(calibration_tokens=64, seq_len=16, greedy_tokens=8)
# an attribute that would make the browser fetch something
REMOTE = re.compile(r"""\b(?:src|href|xlink:href|action|poster)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def reports(source_dirs, fast_options, tmp_path_factory):
    out = {}
    for name in ("llama-gqa", "bert"):
        report = convert(source_dirs(name), tmp_path_factory.mktemp(f"{name}-out"), fast_options(**SMALL))
        out[name] = report.to_dict()
    return out


def assert_self_contained(page: str) -> None:
    assert not REMOTE.search(page), REMOTE.search(page).group()
    assert "url(http" not in page and "@import" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "<iframe" not in page.lower()
    assert "<svg" in page or "data:image/png;base64," in page


def test_llama_report_renders(reports):
    report = reports["llama-gqa"]
    assert report["verdict"]["passed"]
    page = render(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.isascii()  # the rest as character references: any encoding writes it
    assert_self_contained(page)
    assert page.count("<svg") == 3  # local errors, residual errors, heads and Ω
    assert "PASSED" in page and "FAILED" not in page
    assert "LlamaForCausalLM" in page and report["source"]["weights_sha256"] in page
    for site in report["construction"]["sites"]:
        assert site["path"] in page
    assert "tolerance 1e-05" in page  # the tolerance line's legend
    assert "Logits" in page and "KL max" in page and "top-1 agreement" in page
    assert "Greedy continuation" in page and "identical continuation" in page
    # ids are unique in the page although every figure numbers its elements from 1
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert render(report) == page  # deterministic


def test_bert_report_renders_hidden_states_instead_of_logits(reports):
    report = reports["bert"]
    assert "logits" not in report["checks"]["propagated"] and report["checks"]["greedy"] is None
    page = render(report)
    assert_self_contained(page)
    assert "BertModel" in page and "PASSED" in page
    for site in report["construction"]["sites"]:
        assert site["path"] in page
    assert "Final hidden states" in page and "min cosine similarity" in page and "KL max" not in page
    assert "no language-model head" in page


def test_a_failed_report_lists_its_failures(reports):
    report = copy.deepcopy(reports["llama-gqa"])
    site = report["checks"]["local"][0]["site"]
    report["checks"]["local"][0]["ffn_rel"] = 3e-5
    report["checks"]["local"][1]["ffn_rel"] = float("nan")
    report["checks"]["propagated"]["residual"][1]["residual_rel"] = float("inf")
    report["construction"]["sites"][0]["adjusted"] = ["calibration error 4e-06 > 0.25 x tolerance: <tightened>"]
    report["verdict"] = {"passed": False, "failures": [f"{site} local error 3e-05 > tolerance 1e-05"]}
    page = render(report)
    assert_self_contained(page)
    assert "FAILED" in page and f"{site} local error 3e-05 &gt; tolerance 1e-05" in page
    assert "&lt;tightened&gt;" in page and "<tightened>" not in page  # escaped
    assert "class='badrow'" in page


def test_missing_pieces_render(reports):
    report = copy.deepcopy(reports["llama-gqa"])
    report["checks"] = {"inputs": {}, "local": [], "propagated": {}, "greedy": None}
    report["options"]["checks"] = []
    page = render(report)
    assert_self_contained(page)
    assert "The local check was not run" in page and "The propagated check was not run" in page
    assert page.count("<svg") == 1  # heads and Ω still
    assert "<!DOCTYPE html>" in render({})
