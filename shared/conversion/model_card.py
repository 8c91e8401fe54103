"""README.md of a converted directory: the model hub's front matter, what was converted, the
verdict and how to load it, so the directory can be pushed to a hub as it is."""
import json


def render(config: dict, summary: dict, source_name: str | None) -> str:
    section = config["attention_only"]
    base = source_name or section["source"]["architecture"]
    front = {"base_model": source_name} if source_name else {}  # a hub id, when the source config names one
    front.update({"library_name": "transformers", "tags": ["attention-only", section["source"]["model_type"], "attnonly"]})
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items()] + ["---", ""]
    verdict = "passed" if summary["passed"] else "FAILED"
    lines += [
        f"# {base}, attention only",
        "",
        f"`{section['source']['architecture']}` with every FFN replaced by softmax attention heads that compute the "
        f"same function ({summary['ffn_sites']} FFN sites, {summary['attention_heads_added']:,} heads added). "
        "Attention, norms and positions are the source's own.",
        "",
        f"- Equivalence checks against transformers: **{verdict}** (tolerance {section['tolerance']:g} per FFN, "
        f"computed in {section['compute_dtype']}).",
    ]
    for key, label in (("max_local_rel", "largest FFN error (relative)"), ("kl_max", "largest KL of next-token distributions"),
                       ("top1_agreement", "top-1 agreement"), ("hidden_min_cosine", "smallest cosine of hidden states"),
                       ("greedy_identical", "greedy continuation identical")):
        if summary.get(key) is not None:
            lines.append(f"- {label}: {summary[key]:.3g}" if isinstance(summary[key], float) else f"- {label}: {summary[key]}")
    lines += [
        f"- Weights: the source's tensors in {section['storage_dtype']}, head parameters in float32; "
        f"source weights sha256 `{section['source']['weights_sha256'][:16]}…`.",
        f"- Calibrated on {section['calibration']['tokens']} {section['calibration']['kind']} tokens.",
        "",
        "Every measured error is in `report.json`; the format is described in the attnonly repository's docs/FORMAT.md.",
        "",
        "## Loading",
        "",
        "```python",
        "from shared.conversion import load_converted   # pip install attnonly",
        "model = load_converted(\"path/to/this/directory\")",
        "# or: AutoModel...from_pretrained(path, trust_remote_code=True) with attnonly installed",
        "```",
        "",
    ]
    return "\n".join(lines)
