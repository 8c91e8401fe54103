"""Calibration: run the source model layer by layer on calibration tokens and record, per
layer, the range of every FFN pre-activation. Ω, fit ranges and product gains come from these.

Only one layer's weights are in memory at a time: the source attention and norms are the
runtime's own classes loaded with the source tensors, the FFN is evaluated exactly.
"""
from dataclasses import dataclass, field

import torch

from .activations import exact_activation
from .format import runtime_name
from .errors import InvalidOptionsError
from .model import Embedding, Norm, SourceAttention


@dataclass
class LayerStats:
    """Max |.| over calibration tokens; per unit (F,) where a per-unit choice is made."""
    pre_activation_abs: float  # plain: u = W1 x + b1; gated: the gate pre-activation
    pre_activation_max: float
    pre_activation_min: float
    gate_output_abs: torch.Tensor = field(default=None)  # gated: (F,) max |act(gate)| per unit
    up_abs: float = 0.0  # gated: max |W_up x|


def load_into(module: torch.nn.Module, tensors: dict, prefix: str):
    """Copy canonical tensors named prefix + <param name> into a module's parameters."""
    for name, param in module.named_parameters():
        param.data = tensors[prefix + name].to(param.dtype)


def calibration_batches(options, vocab_size: int, max_positions: int) -> list[torch.Tensor]:
    if options.calibration_token_ids is not None:
        bad = [t for seq in options.calibration_token_ids for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise InvalidOptionsError(f"calibration token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        return [torch.tensor([seq[:max_positions]]) for seq in options.calibration_token_ids]
    seq_len = min(options.seq_len, max_positions)
    n_seqs = max(1, -(-options.calibration_tokens // seq_len))
    generator = torch.Generator().manual_seed(options.seed)
    return [torch.randint(0, vocab_size, (n_seqs, seq_len), generator=generator)]


@torch.no_grad()
def calibrate(source, batches: list[torch.Tensor], dtype: torch.dtype, progress=None) -> list[LayerStats]:
    arch = source.arch
    D, norm, decoder = arch["d_model"], arch["norm"], arch["kind"] == "decoder"
    embed = Embedding(arch)
    load_into(embed, {runtime_name(n): source.tensor(n) for n in source.names() if n.startswith("embed.")}, "embed.")
    embed.to(dtype)
    states = [embed(ids, torch.arange(ids.shape[1])) for ids in batches]  # each (B, T, D)
    stats = []
    for i in range(arch["n_layers"]):
        p = f"layers.{i}."
        tensors = {n[len(p):]: source.tensor(n).to(dtype) for n in source.names() if n.startswith(p)}
        attn, attn_norm, ffn_norm = SourceAttention(arch, i), Norm(norm["kind"], D, norm["eps"]), Norm(norm["kind"], D, norm["eps"])
        for module, prefix in ((attn, "attn."), (attn_norm, "attn_norm."), (ffn_norm, "ffn_norm.")):
            load_into(module, tensors, prefix)
            module.to(dtype)
        records = []
        for k, x in enumerate(states):
            positions = torch.arange(x.shape[1])
            if arch["placement"] == "post":
                x = attn_norm(x + attn(x, positions))
                delta, record = exact_ffn(arch, tensors, x)
                x = ffn_norm(x + delta)
            else:
                x = x + attn(attn_norm(x), positions)
                delta, record = exact_ffn(arch, tensors, ffn_norm(x))
                x = x + delta
            states[k] = x
            records.append(record)
        stats.append(merge(records))
        if progress:
            progress("calibrating", i + 1, arch["n_layers"])
    return stats


def linear(x, tensors, name):
    return torch.nn.functional.linear(x, tensors[name + ".weight"], tensors.get(name + ".bias"))


def exact_ffn(arch, tensors, h):
    """The source FFN on normalised input h, and the statistics of its pre-activations."""
    act = arch["ffn"]["activation"]
    if arch["ffn"]["kind"] == "plain":
        u = linear(h, tensors, "ffn.w1")  # (B, T, F)
        return linear(exact_activation(act, u), tensors, "ffn.w2"), {"pre": u}
    gate = linear(h, tensors, "ffn.gate")
    up = linear(h, tensors, "ffn.up")
    s = exact_activation(act, gate)
    return linear(s * up, tensors, "ffn.down"), {"pre": gate, "s": s, "up": up}


def merge(records) -> LayerStats:
    pre = torch.cat([r["pre"].reshape(-1, r["pre"].shape[-1]) for r in records])  # (N, F)
    stats = LayerStats(pre.abs().max().item(), pre.max().item(), pre.min().item())
    if "s" in records[0]:
        s = torch.cat([r["s"].reshape(-1, r["s"].shape[-1]) for r in records])
        stats.gate_output_abs = s.abs().amax(0)
        stats.up_abs = max(r["up"].abs().max().item() for r in records)
    return stats
