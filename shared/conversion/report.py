"""The equivalence report: what was built, every measured error, and the verdict."""
from dataclasses import dataclass, field


@dataclass
class Report:
    config: dict
    options: dict
    local: list = field(default_factory=list)
    propagated: dict = field(default_factory=dict)
    greedy: dict | None = None
    check_inputs: dict = field(default_factory=dict)
    passed: bool = False
    failures: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def finish(self, tolerance: float, logits_rel_factor: float, kl_limit: float):
        """The verdict: every check that ran must meet its threshold (ties are not failures)."""
        failures = []
        for entry in self.local:
            if not entry["ffn_rel"] <= tolerance:
                failures.append(f"{entry['site']} local error {entry['ffn_rel']:.3g} > tolerance {tolerance:.3g}")
        logits = self.propagated.get("logits")
        if logits:
            if not logits["max_rel"] <= logits_rel_factor * tolerance:
                failures.append(f"logits max relative error {logits['max_rel']:.3g} > {logits_rel_factor * tolerance:.3g}")
            if logits["top1_mismatches"]:
                failures.append(f"top-1 differs at {logits['top1_mismatches']} positions that are not ties")
            if not logits["kl_max"] <= kl_limit:
                failures.append(f"KL {logits['kl_max']:.3g} > {kl_limit:.3g}")
        hidden = self.propagated.get("hidden")
        if hidden and not hidden["max_rel"] <= logits_rel_factor * tolerance:
            failures.append(f"hidden states max relative error {hidden['max_rel']:.3g} > {logits_rel_factor * tolerance:.3g}")
        if self.greedy and not self.greedy["passed"]:
            failures.append(f"greedy continuation differs at steps {self.greedy['mismatches']} that are not ties")
        self.failures, self.passed = failures, not failures

    @property
    def summary(self) -> dict:
        """The few numbers a job status shows."""
        section = self.config["attention_only"]
        logits = self.propagated.get("logits") or {}
        hidden = self.propagated.get("hidden") or {}
        return {
            "passed": self.passed,
            "source_architecture": section["source"]["architecture"],
            "ffn_sites": len(section["sites"]),
            "attention_heads_added": sum(s["heads"] for s in section["sites"]),
            "dtype": section["compute_dtype"],
            "storage_dtype": section["storage_dtype"],
            "tolerance": section["tolerance"],
            "max_local_rel": max((e["ffn_rel"] for e in self.local), default=None),
            "logits_max_abs": logits.get("max_abs"),
            "logits_max_rel": logits.get("max_rel", hidden.get("max_rel")),
            "kl_max": logits.get("kl_max"),
            "top1_agreement": logits.get("top1_agreement"),
            "hidden_min_cosine": hidden.get("min_cosine"),
            "greedy_identical": self.greedy["identical"] if self.greedy else None,
            "greedy_ties": len(self.greedy["ties"]) if self.greedy else None,
            "failures": self.failures,
        }

    def to_dict(self) -> dict:
        return {
            "format": self.config["attention_only"]["format"],
            "source": self.config["attention_only"]["source"],
            "options": self.options,
            "calibration": self.config["attention_only"]["calibration"],
            "construction": {"kind": self.config["attention_only"]["construction"],
                             "sites": self.config["attention_only"]["sites"]},
            "checks": {"inputs": self.check_inputs, "local": self.local, "propagated": self.propagated, "greedy": self.greedy},
            "verdict": {"passed": self.passed, "failures": self.failures},
            "summary": self.summary,
            "timings": self.timings,
            "files": self.files,
        }
