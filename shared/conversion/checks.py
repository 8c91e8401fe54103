"""Layer-by-layer equivalence against transformers' own forward pass (DESIGN.md §7).

local       the source's residual entering block l is fed to the source block (inside
            transformers, captured by hooks) and to the converted block l; every converted
            FFN sublayer is fed the input transformers' MLP saw. Isolates each layer's error.
propagated  each model runs on its own from the tokens; residuals after every block, then
            logits: max |Δ|, max relative, RMS, KL, top-1, and a greedy continuation.
Errors are relative to the reference's scale: max |Δ| / max |reference|.
"""
import time

import torch
import torch.nn.functional as F

from .errors import UnsupportedArchitectureError


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def load_reference(source_dir, arch: dict, dtype: torch.dtype):
    import transformers  # the reference implementation; the runtime itself never needs it

    cls = getattr(transformers, arch["source_architecture"], None)
    if cls is None:
        raise UnsupportedArchitectureError(f"transformers has no class {arch['source_architecture']}")
    model = cls.from_pretrained(str(source_dir), dtype=dtype)
    return model.eval()


def reference_layers(model, arch):
    if arch["family"] == "gpt2":
        return list((model.transformer if hasattr(model, "transformer") else model).h)
    if arch["family"] == "llama":
        return list(model.model.layers)
    return list((model.bert if hasattr(model, "bert") else model).encoder.layer)


def mlp_modules(layer, arch):
    """(module whose input is the FFN input, module whose output is the FFN output)."""
    if arch["family"] == "bert":
        return layer.intermediate, layer.output.dense
    return layer.mlp, layer.mlp


class Capture:
    """Forward hooks recording each reference layer's input/output and FFN input/output."""

    def __init__(self, layers, arch):
        self.records = [dict() for _ in layers]
        self.handles = []
        for record, layer in zip(self.records, layers):
            ffn_in, ffn_out = mlp_modules(layer, arch)
            self.handles += [
                layer.register_forward_hook(self.block_hook(record), with_kwargs=True),
                ffn_in.register_forward_hook(lambda m, args, out, r=record: r.__setitem__("ffn_in", args[0])),
                ffn_out.register_forward_hook(lambda m, args, out, r=record: r.__setitem__("ffn_out", out)),
            ]

    @staticmethod
    def block_hook(record):
        def hook(module, args, kwargs, out):
            record["block_in"] = args[0] if args else kwargs["hidden_states"]
            record["block_out"] = out[0] if isinstance(out, tuple) else out
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def local_errors(converted, reference, arch, tokens, progress=None) -> list[dict]:
    layers = reference_layers(reference, arch)
    capture = Capture(layers, arch)
    try:
        reference(input_ids=tokens)
    finally:
        capture.remove()
    positions = torch.arange(tokens.shape[1])
    results = []
    for i, (record, block) in enumerate(zip(capture.records, converted.layers)):
        x = record["block_in"]
        scratch = x.new_zeros(*x.shape[:2], converted.scratch_width) if converted.scratch_width else None
        ours_block, _ = block(x, scratch, positions)
        ours_ffn, _ = block.ffn_output(record["ffn_in"], scratch, None, {})
        entry = {"layer": i, "ffn_rel": relative(ours_ffn, record["ffn_out"]),
                 "block_rel": relative(ours_block, record["block_out"])}
        if block.gated:
            mlp = layers[i].mlp
            s_ref = mlp.act_fn(mlp.gate_proj(record["ffn_in"]))
            entry["gate_rel"] = relative(block.gate(record["ffn_in"]), s_ref)
        results.append(entry)
        if progress:
            progress("checking", i + 1, len(converted.layers))
    return results


@torch.no_grad()
def propagated_errors(converted, reference, arch, tokens) -> dict:
    out = reference(input_ids=tokens, output_hidden_states=True)
    hidden = out.hidden_states
    ours = list(converted.residual_stream(tokens))
    L = len(converted.layers)
    residual = []
    for i in range(1, L + 1):
        x = ours[i]
        if i == L and converted.final_norm is not None:
            x = converted.final_norm(x)  # transformers applies the final norm to its last hidden state
        residual.append({"layer": i - 1, "residual_rel": relative(x, hidden[i])})
    result = {"residual": residual}
    if converted.arch["lm_head"] != "none":
        result["logits"] = logit_metrics(converted.head(ours[-1]), out.logits)
    else:
        result["hidden"] = {"max_abs": (converted.head(ours[-1]).double() - out.last_hidden_state.double()).abs().max().item(),
                            "max_rel": relative(converted.head(ours[-1]), out.last_hidden_state)}
    return result


def logit_metrics(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.double(), ref.double()
    diff = ours - ref
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(ours, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T): KL(reference || converted)
    return {
        "max_abs": diff.abs().max().item(),
        "max_rel": (diff.abs().max() / ref.abs().max()).item(),
        "rms": diff.pow(2).mean().sqrt().item(),
        "reference_max_abs": ref.abs().max().item(),
        "kl_max": kl.max().clamp_min(0).item(),
        "kl_mean": kl.mean().clamp_min(0).item(),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).double().mean().item(),
    }


@torch.no_grad()
def greedy_agreement(converted, reference, prompt, new_tokens: int) -> dict:
    started = time.perf_counter()
    ours = converted.generate(prompt, new_tokens)[:, prompt.shape[1]:]
    ref = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)[:, prompt.shape[1]:]
    matching = (ours == ref).all(0).long()
    first_mismatch = int(matching.argmin()) if not matching.all() else None
    return {"tokens": new_tokens, "identical": first_mismatch is None, "first_mismatch": first_mismatch,
            "matching_tokens": int(matching.cumprod(0).sum()), "seconds": time.perf_counter() - started}
