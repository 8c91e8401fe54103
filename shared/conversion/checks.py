"""Equivalence against transformers' own forward pass (docs/DESIGN.md §7).

local       every FFN site's heads against the source module in float64, on the inputs the
            site saw in the reference pass (calibrate.LocalCheck): the construction's error
propagated  each model runs on its own from the tokens: hidden states after every block, then
            logits (max |Δ|, max relative, RMS, KL, top-1) or, without an LM head, the last
            hidden states (max relative, min cosine)
greedy      transformers' generate() on both; a step where the two part is a tie when the
            reference's top-two logits there are closer than twice the measured logit error
            (counted, reported, and the comparison goes on from the reference's token)

The measured logit error is the largest over the positions where both models agree on the
top token: measured away from the parting itself (where the error must reach half the
reference's margin for the models to part at all).
"""
import time

import torch
import torch.nn.functional as F

from .patterns import relative_error


def model_inputs(batch, encoder_decoder: bool) -> dict:
    inputs = {"input_ids": batch.input_ids}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    if encoder_decoder:
        inputs["decoder_input_ids"] = batch.input_ids
    return inputs


def hidden_states(out) -> list[torch.Tensor]:
    states = []
    for key in ("encoder_hidden_states", "decoder_hidden_states", "hidden_states"):
        value = getattr(out, key, None)
        if value is not None:
            states.extend(value)
    return states


def final_output(out) -> tuple[str, torch.Tensor]:
    logits = getattr(out, "logits", None)
    return ("logits", logits) if logits is not None else ("hidden", out.last_hidden_state)


@torch.no_grad()
def run(model, batch, encoder_decoder: bool, hidden_states: bool = True):
    return model(**model_inputs(batch, encoder_decoder), output_hidden_states=hidden_states, use_cache=False)


def propagated(ours_out, ref_out, attention_mask) -> dict:
    keep = None if attention_mask is None else attention_mask.bool()
    residual = []
    for i, (a, b) in enumerate(zip(hidden_states(ours_out), hidden_states(ref_out))):
        residual.append({"index": i, "residual_rel": relative_error(_real(a, keep), _real(b, keep))})
    kind, ours = final_output(ours_out)
    _, ref = final_output(ref_out)
    result = {"residual": residual}
    if kind == "logits":
        result["logits"] = logit_metrics(_real(ours, keep), _real(ref, keep))
    else:
        ours, ref = _real(ours, keep).double(), _real(ref, keep).double()
        result["hidden"] = {"max_abs": float((ours - ref).abs().max()), "max_rel": relative_error(ours, ref),
                            "min_cosine": float(F.cosine_similarity(ours, ref, dim=-1).min())}
    return result


def _real(x, keep):
    """The positions of real tokens only, flattened: (N, ...)."""
    if keep is None or x.shape[:2] != keep.shape:
        return x.reshape(-1, x.shape[-1])
    return x[keep]


def logit_metrics(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """ours, ref (N, V)."""
    ours, ref = ours.double(), ref.double()
    diff = ours - ref
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(ours, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,): KL(reference || converted)
    top2 = ref.topk(2, dim=-1).values if ref.shape[-1] > 1 else torch.cat((ref, ref), -1)
    gap = top2[:, 0] - top2[:, 1]
    disagree = ours.argmax(-1) != ref.argmax(-1)
    ties = disagree & (gap <= 2 * tie_scale(diff.abs().amax(-1), ~disagree))
    return {
        "max_abs": float(diff.abs().max()), "max_rel": float(diff.abs().max() / ref.abs().max()),
        "rms": float(diff.pow(2).mean().sqrt()), "reference_max_abs": float(ref.abs().max()),
        "kl_max": float(kl.max().clamp_min(0)), "kl_mean": float(kl.mean().clamp_min(0)),
        "top1_agreement": float((~disagree).double().mean()),
        "top1_ties": int(ties.sum()), "top1_mismatches": int((disagree & ~ties).sum()),
    }


def tie_scale(errors: torch.Tensor, agree: torch.Tensor) -> float:
    """The logit error to judge ties by: the largest where the models agree, else the median."""
    return float(errors[agree].max()) if bool(agree.any()) else float(errors.median())


@torch.no_grad()
def greedy(converted, reference, prompt: torch.Tensor, new_tokens: int, encoder_decoder: bool) -> dict:
    """Greedy continuations of `prompt` (1, P) from transformers' generate() on both models."""
    started = time.perf_counter()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))
    if encoder_decoder:
        config = reference.config
        kwargs["decoder_start_token_id"] = next(
            (t for t in (getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None), 0)
             if t is not None))
    ref = reference.generate(input_ids=prompt, output_logits=True, output_scores=True, return_dict_in_generate=True,
                             **kwargs)
    ref_tokens = ref.sequences[0, -new_tokens:]
    # tokens generate() ruled out (min_new_tokens masks EOS) are out of the comparison too
    banned = torch.cat(ref.scores).isneginf()  # (N, V)
    ref_logits = torch.cat(ref.logits).double().masked_fill(banned, -torch.inf)  # (N, V)
    ours_tokens = converted.generate(input_ids=prompt, **kwargs)[0, -new_tokens:]
    # the converted model's logits along the reference's own continuation (teacher forcing)
    if encoder_decoder:
        ours_logits = converted(input_ids=prompt, decoder_input_ids=ref.sequences[:, :-1]).logits[0, -new_tokens:].double()
    else:
        full = torch.cat((prompt, ref_tokens[None, :-1]), dim=1)
        ours_logits = converted(input_ids=full, use_cache=False).logits[0, -new_tokens:].double()
    ours_logits = ours_logits.masked_fill(banned, -torch.inf)
    error = (ours_logits - ref_logits).nan_to_num(0.0).abs().amax(-1)  # (N,)
    forced = ours_logits.argmax(-1) != ref_tokens
    top2 = ref_logits.topk(2, dim=-1).values
    tie_at = (top2[:, 0] - top2[:, 1]) <= 2 * tie_scale(error, ~forced)
    mismatches = [int(i) for i in torch.where(forced & ~tie_at)[0]]
    ties = [int(i) for i in torch.where(forced & tie_at)[0]]
    parted = ours_tokens != ref_tokens
    first_part = int(parted.nonzero()[0]) if bool(parted.any()) else None
    # generate() may part from the reference only where a tie lets it
    if first_part is not None and not bool(tie_at[first_part]) and first_part not in mismatches:
        mismatches.append(first_part)
    return {"tokens": new_tokens, "identical": first_part is None, "first_parting": first_part,
            "ties": ties, "mismatches": sorted(mismatches), "passed": not mismatches,
            "seconds": time.perf_counter() - started}
