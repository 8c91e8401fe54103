"""Equivalence against transformers' own forward pass (docs/DESIGN.md §7).

local       every FFN site's heads against the source module in float64, on the inputs the
            site saw in the reference pass (calibrate.LocalCheck): the construction's error
propagated  each model runs on its own from the tokens: hidden states after every block, then
            logits (max |Δ|, max relative, RMS, KL, top-1) or, without an LM head, the last
            hidden states (max relative, min cosine). Neither pass keeps its hidden states: the
            reference's go to a temporary file as they are made (StoredStates), the converted
            model's are compared with them one by one (Residuals), so memory stays flat in depth
greedy      transformers' generate() on both; a step where the two part is a tie when the
            reference's top-two logits there are closer than twice the measured logit error
            (counted, reported, and the comparison goes on from the reference's token)

The measured logit error is the largest over the positions where both models agree on the
top token: measured away from the parting itself (where the error must reach half the
reference's margin for the models to part at all).

Both models compute on the conversion's device (run(..., device)); what crosses from one pass to
the other (the reference's hidden states and its output) is on the CPU, and so are the metrics.
"""
import contextvars
import io
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from .patterns import relative_error


def model_inputs(batch, encoder_decoder: bool, device: torch.device | None = None) -> dict:
    """The batch as keyword arguments of the model's forward, on `device` (None: where the batch is)."""
    inputs = {"input_ids": batch.input_ids}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    if encoder_decoder:
        inputs["decoder_input_ids"] = batch.input_ids
    return inputs if device is None else {k: v.to(device) for k, v in inputs.items()}


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
def run(model, batch, encoder_decoder: bool, keep_states: bool = True, on_state=None, device=None):
    """The model's forward on batch, computed on `device` (None: where the batch is); the output
    comes back on the CPU. on_state(index, state) gets every hidden state (on `device`), indexed as
    in hidden_states(output); unless keep_states, they are handed over as the model makes them and
    the output keeps an empty tensor in their place (models that collect them without
    transformers' output capturing hand them over from the output, after the pass)."""
    inputs = model_inputs(batch, encoder_decoder, device)
    if on_state is None or keep_states:
        out = model(**inputs, output_hidden_states=keep_states, use_cache=False)
        for index, state in enumerate(hidden_states(out) if on_state else []):
            on_state(index, state)
        return _on_cpu(out)
    stream = _Stream(on_state)
    token = _STREAM.set(stream if _capture_passes_states() else None)
    try:
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        _STREAM.reset(token)
    for state in hidden_states(out):
        if state is not None and state is not PASSED_ON:
            stream(stream.next, state)
    return _on_cpu(out)


def _on_cpu(out):
    """The model's output with its tensors on the CPU, in place (it keeps its class)."""
    for key, value in out.items():
        out[key] = send_to_device(value, "cpu")
    return out


# transformers' output capturing (capture_outputs) collects a forward's hidden states in a list it
# makes for each forward and hands to its hooks through output_capturing._active_collector.set().
# Inside run(..., keep_states=False) that list is replaced by one that passes each state on and
# keeps PASSED_ON: the states of every block are then never alive together. (Not None: the
# collector takes a None last entry for "not selected" and would skip the final norm's output.)
PASSED_ON = torch.empty(0)
_STREAM = contextvars.ContextVar("attnonly_hidden_state_stream", default=None)


class _Stream:
    """on_state with the running index across the lists of one forward (encoder, then decoder)."""

    def __init__(self, on_state):
        self.on_state, self.next = on_state, 0

    def __call__(self, index: int, state: torch.Tensor) -> None:
        self.on_state(index, state)
        self.next = max(self.next, index + 1)


class _PassedOn(list):
    def __init__(self, stream: _Stream, base: int | None = None, items=()):
        super().__init__(items)
        self.stream, self.base = stream, stream.next if base is None else base

    def append(self, state):
        if state is not None:  # capture_outputs replaces the last state by the final norm's output: same index
            self.stream(self.base + len(self), state)
        super().append(None if state is None else PASSED_ON)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return _PassedOn(self.stream, self.base, super().__getitem__(key))
        return super().__getitem__(key)


def _capture_passes_states() -> bool:
    """Whether transformers' collector hands this module's list to its hooks (installed once; the
    replacement is inert outside run(..., keep_states=False)). False where transformers has no such
    collector: the states are then handed over from the output."""
    try:
        from transformers.utils import output_capturing

        collector = output_capturing._active_collector
    except (ImportError, AttributeError):
        return False
    if getattr(collector, "attnonly_passes_states", False):
        return True
    original = collector.set

    def set_(value):
        stream = _STREAM.get()
        if stream is not None and isinstance(value, dict) and isinstance(value.get("hidden_states"), list):
            value["hidden_states"] = _PassedOn(stream)
        return original(value)

    collector.set, collector.attnonly_passes_states = set_, True
    return True


class StoredStates:
    """on_state for the reference pass: each hidden state at the real positions, written to a
    temporary file (not kept in memory) as the pass makes it."""

    def __init__(self, attention_mask):
        self.keep = None if attention_mask is None else attention_mask.bool()
        # index -> one entry per time the pass handed that index over: transformers' capture hands
        # the last index over twice (the last block's output, then the model's last_hidden_state,
        # which may be projected to another width: OPT's project_out), the converted pass alike
        self.file, self.where = tempfile.TemporaryFile(prefix="attnonly-states-"), {}

    def __call__(self, index: int, state: torch.Tensor) -> None:
        rows = _real(state.detach().cpu(), self.keep).contiguous()
        offset = self.file.seek(0, io.SEEK_END)
        self.file.write(rows.view(-1).view(torch.uint8).numpy().tobytes())
        self.where.setdefault(index, []).append((offset, rows.dtype, tuple(rows.shape)))

    def occurrences(self, index: int) -> int:
        return len(self.where.get(index, ()))

    def get(self, index: int, occurrence: int = -1) -> torch.Tensor:
        offset, dtype, shape = self.where[index][occurrence]
        self.file.seek(offset)
        data = bytearray(self.file.read(math.prod(shape) * dtype.itemsize))
        return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self.file.close()


class Residuals:
    """on_state for the converted pass: each hidden state against the reference's stored one; keeps
    only the relative error."""

    def __init__(self, reference: StoredStates):
        self.reference, self.errors = reference, {}

    def __call__(self, index: int, state: torch.Tensor) -> None:
        """Against the reference's last state at this index; a later state at the same index
        replaces the figure, so each index ends as last against last. (A pass that streams hands
        the last index over twice, the block's output then the model's last_hidden_state; a
        pass read from its output, as the explicit form's, only the second: the first one of a
        streamed pass can have another width, OPT's projection, and is then skipped.)"""
        if not self.reference.occurrences(index):
            return
        ours = _real(state.detach().cpu(), self.reference.keep)  # against the stored state, on the CPU
        if tuple(ours.shape) == self.reference.where[index][-1][2]:
            self.errors[index] = relative_error(ours, self.reference.get(index))

    def table(self) -> list[dict]:
        return [{"index": i, "residual_rel": e} for i, e in sorted(self.errors.items())]


def propagated(ours_out, ref_out, attention_mask, residual: list[dict]) -> dict:
    """residual: Residuals.table() of the converted pass against the reference's."""
    keep = None if attention_mask is None else attention_mask.bool()
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
    """Greedy continuations of `prompt` (1, P) from transformers' generate() on both models, which
    compute on the prompt's device (the conversion's: every tensor here follows the prompt)."""
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
