"""Source families: each reads a Hugging Face directory into a neutral description.

The description is an `arch` dict (what the runtime needs to know) plus tensors under
canonical names (`layers.3.ffn.w1.weight`, ...), read lazily from the checkpoint.
"""
import torch

from ..errors import ShapeMismatchError, UnsupportedArchitectureError
from . import bert, gpt2, llama
from .checkpoint import SourceCheckpoint

FAMILIES = {module.FAMILY: module for module in (gpt2, llama, bert)}
SUPPORTED_ARCHITECTURES = sorted(a for module in FAMILIES.values() for a in module.ARCHITECTURES)


def family_for(config: dict):
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    for module in FAMILIES.values():
        if any(a in module.ARCHITECTURES for a in architectures):
            return module
    for module in FAMILIES.values():
        if not architectures and model_type in module.MODEL_TYPES:
            return module
    named = ", ".join(architectures) or f"model_type={model_type!r}"
    raise UnsupportedArchitectureError(
        f"{named} is not supported; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


class SourceModel:
    """A source checkpoint seen through its family: `arch` plus canonical tensors."""

    def __init__(self, directory, allow_pickle: bool = False):
        self.checkpoint = SourceCheckpoint(directory, allow_pickle=allow_pickle)
        self.family = family_for(self.checkpoint.config)
        self.arch = self.family.describe(self.checkpoint.config)
        prefix = self.family.detect_prefix(self.checkpoint.names())
        self._sources = self.family.tensor_sources(self.arch, prefix)  # canonical -> (hf name, transform)
        self._shapes = expected_shapes(self.arch)
        missing = sorted(n for n, (hf, _) in self._sources.items() if not self.checkpoint.has(hf))
        if missing:
            hf_missing = [self._sources[n][0] for n in missing[:5]]
            raise ShapeMismatchError(
                f"the checkpoint lacks tensors its config implies, e.g. {hf_missing} "
                f"({len(missing)} missing)"
            )

    def names(self) -> list[str]:
        return list(self._sources)

    def tensor(self, name: str) -> torch.Tensor:
        hf_name, transform = self._sources[name]
        tensor = transform(self.checkpoint.tensor(hf_name))
        expected = self._shapes[name]
        if tuple(tensor.shape) != expected:
            raise ShapeMismatchError(
                f"{hf_name} has shape {tuple(tensor.shape)} but the config implies {expected} for {name}"
            )
        return tensor.contiguous()


def expected_shapes(arch: dict) -> dict[str, tuple]:
    D, V, F = arch["d_model"], arch["vocab_size"], arch["ffn"]["width"]
    att = arch["attention"]
    q_out, kv_out = att["n_heads"] * att["head_dim"], att["n_kv_heads"] * att["head_dim"]
    shapes = {"embed.tokens": (V, D)}
    if arch["embedding"]["positions"] == "learned":
        shapes["embed.positions"] = (arch["max_positions"], D)
    if arch["embedding"]["token_types"]:
        shapes["embed.token_types"] = (arch["embedding"]["token_types"], D)
    norm_params = ("weight", "bias") if arch["norm"]["kind"] == "layernorm" else ("weight",)
    if arch["embedding"]["norm"]:
        shapes.update({f"embed.norm.{p}": (D,) for p in norm_params})
    for i in range(arch["n_layers"]):
        p = f"layers.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            shapes.update({f"{p}{norm}.{q}": (D,) for q in norm_params})
        shapes.update({p + "attn.q.weight": (q_out, D), p + "attn.k.weight": (kv_out, D),
                       p + "attn.v.weight": (kv_out, D), p + "attn.o.weight": (D, q_out)})
        if att["bias_qkv"]:
            shapes.update({p + "attn.q.bias": (q_out,), p + "attn.k.bias": (kv_out,), p + "attn.v.bias": (kv_out,)})
        if att["bias_o"]:
            shapes[p + "attn.o.bias"] = (D,)
        ffn = arch["ffn"]
        if ffn["kind"] == "plain":
            shapes.update({p + "ffn.w1.weight": (F, D), p + "ffn.w2.weight": (D, F)})
            if ffn["bias"]:
                shapes.update({p + "ffn.w1.bias": (F,), p + "ffn.w2.bias": (D,)})
        else:
            shapes.update({p + "ffn.gate.weight": (F, D), p + "ffn.up.weight": (F, D), p + "ffn.down.weight": (D, F)})
            if ffn["bias"]:
                shapes.update({p + "ffn.gate.bias": (F,), p + "ffn.up.bias": (F,), p + "ffn.down.bias": (D,)})
    if arch["final_norm"]:
        shapes.update({f"final_norm.{q}": (D,) for q in norm_params})
    if arch["lm_head"] == "separate":
        shapes["lm_head.weight"] = (V, D)
    return shapes
