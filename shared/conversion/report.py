"""The equivalence report: what was built, every measured error, and the verdict."""
from dataclasses import dataclass, field


@dataclass
class Report:
    config: dict
    options: dict
    local: list = field(default_factory=list)
    propagated: dict = field(default_factory=dict)
    greedy: dict | None = None
    passed: bool = False
    failures: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def finish(self, tolerance: float, logits_rel_factor: float, kl_limit: float):
        """The verdict: every check that ran must meet its threshold."""
        failures = []
        for entry in self.local:
            for key in ("ffn_rel", "gate_rel", "block_rel"):
                if key in entry and not entry[key] <= tolerance:
                    failures.append(f"layer {entry['layer']} local {key} {entry[key]:.3g} > tolerance {tolerance:.3g}")
        logits = self.propagated.get("logits")
        if logits:
            if not logits["max_rel"] <= logits_rel_factor * tolerance:
                failures.append(f"logits max relative error {logits['max_rel']:.3g} > {logits_rel_factor * tolerance:.3g}")
            if logits["top1_agreement"] < 1.0:
                failures.append(f"top-1 agreement {logits['top1_agreement']:.4%} < 100%")
            if not logits["kl_max"] <= kl_limit:
                failures.append(f"KL {logits['kl_max']:.3g} > {kl_limit:.3g}")
        hidden = self.propagated.get("hidden")
        if hidden and not hidden["max_rel"] <= logits_rel_factor * tolerance:
            failures.append(f"hidden states max relative error {hidden['max_rel']:.3g} > {logits_rel_factor * tolerance:.3g}")
        if self.greedy and not self.greedy["identical"]:
            failures.append(f"greedy continuation differs at token {self.greedy['first_mismatch']}")
        self.failures, self.passed = failures, not failures

    @property
    def summary(self) -> dict:
        """The few numbers a job status shows."""
        layers = self.config["layers"]
        logits = self.propagated.get("logits") or {}
        hidden = self.propagated.get("hidden") or {}
        return {
            "passed": self.passed,
            "source_architecture": self.config["source"]["architecture"],
            "layers": len(layers),
            "attention_heads_added": sum(s["heads"] for l in layers for s in l["sublayers"] if s["kind"] != "attention"),
            "dtype": self.config["dtype"],
            "tolerance": self.config["tolerance"],
            "max_local_rel": max((max(v for k, v in e.items() if k.endswith("_rel")) for e in self.local), default=None),
            "logits_max_abs": logits.get("max_abs"),
            "logits_max_rel": logits.get("max_rel", hidden.get("max_rel")),
            "kl_max": logits.get("kl_max"),
            "top1_agreement": logits.get("top1_agreement"),
            "greedy_identical": self.greedy["identical"] if self.greedy else None,
            "failures": self.failures,
        }

    def to_dict(self) -> dict:
        return {
            "format": self.config["format"],
            "source": {k: v for k, v in self.config["source"].items() if k != "config"},
            "options": self.options,
            "construction": {
                "kind": self.config["construction"],
                "layers": [{"index": l["index"], "sublayers": l["sublayers"]} for l in self.config["layers"]],
            },
            "checks": {"local": self.local, "propagated": self.propagated, "greedy": self.greedy},
            "verdict": {"passed": self.passed, "failures": self.failures},
            "summary": self.summary,
            "timings": self.timings,
            "files": self.files,
        }
