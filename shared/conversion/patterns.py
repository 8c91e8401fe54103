"""The FFN registry: which module shapes are FFNs, as a table (docs/ARCHITECTURE.md, "Adding
an FFN pattern"). Matching is by structure and attribute names, never by model_type; every
match is then verified numerically (calibrate.py) before anything is converted.

    Plain    down(act(up x))            the activation becomes NeuronHeads
    Gated    down(act(gate x) * up x)   the module becomes GatedHeads (fused: gate_up, gated half first)
    Experts  fused 3-D expert tensors   the module becomes HeadExperts; the router stays

Paths are relative to the matched module and may be dotted (BERT's FFN spans two modules).
"""
import functools
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .activations import exact_activation
from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Plain:
    act: str
    up: str
    down: str
    kind = "plain"


@dataclass(frozen=True)
class Gated:
    act: str | None  # None: the module calls its activation as a function; the verification finds which
    down: str | None  # None: the module ends at the product (cpmant: its down projection is the parent's)
    gate: str | None = None
    up: str | None = None
    fused: str | None = None  # one projection whose output halves are (gate, up)
    kind = "gated"


@dataclass(frozen=True)
class Experts:
    act: str = "act_fn"
    gate_up: str = "gate_up_proj"  # (E, 2F, D) parameter
    down: str = "down_proj"  # (E, D, F) parameter
    transposed: bool = False  # True: (E, D, 2F) and (E, F, D), applied as x @ W (aria)
    kind = "experts"

    def shapes(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[int, int, int] | None:
        """(E, F, D) when the two tensors have this layout, else None."""
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
            return None
        E, two_f, d = (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1]) if self.transposed else gate_up.shape
        F, d_down = (down.shape[1], down.shape[2]) if self.transposed else (down.shape[2], down.shape[1])
        return (E, F, d) if two_f == 2 * F and d == d_down else None


# Families named here are examples seen to match, not a list of what is supported.
PATTERNS = (
    Experts(),                                                          # mixtral, qwen2/3_moe, olmoe, ...
    Experts(transposed=True),                                           # aria
    Gated(act="act_fn", gate="gate_proj", up="up_proj", down="down_proj"),  # llama, mistral, qwen2/3, gemma*, olmo*, smollm3
    Gated(act="activation_fn", fused="gate_up_proj", down="down_proj"),    # phi3
    Gated(act="act_fn", fused="gate_up_proj", down="down_proj"),
    Gated(act="act", gate="wi_0", up="wi_1", down="wo"),                  # t5 gated-gelu, umt5, mt5
    Gated(act="act", fused="Wi", down="Wo"),                              # modernbert
    Gated(act="act_fn", gate="w1", up="w3", down="w2"),
    Gated(act=None, gate="w1", up="w3", down="w2"),                       # lfm2: F.silu inline
    Gated(act="activation_fn", gate="gate_proj", up="up_proj", down="down_proj"),  # llama4
    Gated(act="activation", fused="input_linear", down="output_linear"),   # granitemoehybrid
    Gated(act="act_fn", gate="proj_up_gate", up="proj_up", down="proj_down"),  # xlstm
    Gated(act="act", gate="w_0", up="w_1", down=None),                    # cpmant (w_in; w_out is its parent's)
    Plain(act="act", up="c_fc", down="c_proj"),                           # gpt2, gpt_neo, gpt_bigcode, starcoder2
    Plain(act="act", up="fc_in", down="fc_out"),                          # gptj, codegen
    Plain(act="act", up="dense_h_to_4h", down="dense_4h_to_h"),           # gpt_neox, falcon
    Plain(act="gelu_impl", up="dense_h_to_4h", down="dense_4h_to_h"),     # bloom
    Plain(act="activation_fn", up="fc1", down="fc2"),                     # opt, phi, biogpt, xglm
    Gated(act="activation_fn", fused="fc1", down="fc2"),                  # moshi (fc1 is 2F wide)
    Plain(act="act", up="fc1", down="fc2"),
    Plain(act="activation", up="lin1", down="lin2"),                      # distilbert
    Plain(act="act", up="lin1", down="lin2"),                             # xlm
    Plain(act="activation_function", up="layer_1", down="layer_2"),       # xlnet
    Plain(act="dense.act_fn", up="dense.dense", down="output.dense"),     # reformer
    Plain(act="act", up="wi", down="wo"),                                 # t5 (relu)
    Plain(act="act_fn", up="up_proj", down="down_proj"),
    Plain(act="act", up="up_proj", down="down_proj"),                     # mpt
    Plain(act="activation_fn", up="intermediate", down="output"),         # prophetnet
    Plain(act="intermediate.intermediate_act_fn", up="intermediate.dense", down="output.dense"),  # bert, roberta
    Plain(act="1", up="0", down="2"),                                     # ctrl: nn.Sequential(Linear, ReLU, Linear)
)

# Class names that look like an FFN: one that no pattern covers is refused, not left in place.
FFN_LIKE = re.compile(r"(mlp|ffn|feedforward|feed_forward|intermediate|denseactdense|densegatedactdense|experts)$", re.I)


@dataclass
class Site:
    """One matched FFN: where it is, its shape, its activation, and whether its heads are causal."""
    path: str  # the matched module
    pattern: Plain | Gated | Experts
    activation: str
    causal: bool
    units: int  # F (per expert for Experts)

    @property
    def layer(self) -> int:
        """The first integer in the path: the block index."""
        found = re.search(r"\.(\d+)(\.|$)", self.path)
        return int(found.group(1)) if found else 0

    def join(self, relative: str) -> str:
        return f"{self.path}.{relative}" if self.path else relative


def get_path(module: nn.Module, dotted: str):
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return getattr(module, dotted, None) if "." not in dotted else None


def is_projection(module) -> bool:
    return isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_activation(module) -> bool:
    """A parameter-free module that is not a projection or a container of others."""
    return (isinstance(module, nn.Module) and not any(True for _ in module.parameters())
            and not any(True for _ in module.children()))


UNKNOWN_ACTIVATION = "?"  # a Site's activation until the calibration's verification finds it


def _matches(module: nn.Module, pattern) -> bool:
    if getattr(module, "is_attention_only", False):
        return False  # our own head modules keep the source's projection names
    if pattern.act is None:
        if any(is_activation(c) for c in module.children()):
            return False  # an activation module is there: a row naming it applies, or none
    elif not is_activation(get_path(module, pattern.act)):
        return False
    if isinstance(pattern, Experts):
        gate_up, down = getattr(module, pattern.gate_up, None), getattr(module, pattern.down, None)
        # the row's layout, no extra gate_up rows (longcat_flash's zero-compute identity experts), and
        # routing handed in (llama4's experts take the hidden states alone and route outside)
        return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
                and pattern.shapes(gate_up, down) is not None and _takes_routing(type(module)))
    names = ([pattern.down] if pattern.down else []) + ([pattern.fused] if getattr(pattern, "fused", None) else [pattern.up] +
                              ([pattern.gate] if isinstance(pattern, Gated) else []))
    if not all(is_projection(get_path(module, n)) for n in names):
        return False
    if not pattern.down:
        return True
    # widths must chain: one name can be plain in one model and fused in another (moshi's fc1 is 2F wide)
    width = in_features(get_path(module, pattern.down))
    if getattr(pattern, "fused", None):
        return out_features(get_path(module, pattern.fused)) == 2 * width
    return all(out_features(get_path(module, n)) == width for n in names[1:])


def in_features(module: nn.Module) -> int:
    """Input width of a Linear-like module (transformers' Conv1D keeps its weight as (in, out))."""
    if hasattr(module, "nx"):
        return int(module.nx)
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[-1])


@functools.cache
def _takes_routing(cls) -> bool:
    """Whether cls.forward takes routing after the hidden states (top-k indices and weights, as
    HeadExperts does), not the hidden states alone."""
    try:
        parameters = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_POSITIONAL for p in parameters) or len(parameters) >= 4


def out_features(module: nn.Module) -> int:
    """Output width of a Linear-like module: nn.Linear, transformers' Conv1D (weight (in, out)), ..."""
    if hasattr(module, "nf"):
        return int(module.nf)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(module.weight.shape[0])


ACTIVATIONS = ("silu", "gelu_erf", "gelu_tanh", "quick_gelu", "relu", "relu2")
PROBE = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)


def identify_activation(act: nn.Module, where: str, samples: torch.Tensor | None = None) -> str:
    """The activation `act` computes, found numerically (float64) among those we can build; on the
    samples' device (the pass's) when given."""
    x = PROBE if samples is None else torch.cat((PROBE.to(samples.device), samples.detach().double().reshape(-1)))
    with torch.no_grad():
        y = act(x.clone())
    for name in ACTIVATIONS:
        target = exact_activation(name, x)
        if float((y.double() - target).abs().max()) <= 1e-6 * max(float(target.abs().max()), 1.0):
            return name
    raise UnsupportedArchitectureError(
        f"{where}: activation {type(act).__name__} is none of silu, gelu (erf or tanh), quick_gelu, relu, relu² "
        "(compared numerically in float64); it cannot be rebuilt from attention heads")


def is_causal_site(path: str, model_causal: bool, encoder_decoder: bool) -> bool:
    if encoder_decoder:
        return "encoder" not in path.split(".")
    return model_causal


def find_sites(model: nn.Module, *, causal: bool, encoder_decoder: bool) -> list[Site]:
    """Every FFN of `model` (built on the meta device is fine), in module order. Refuses an
    FFN-like module that no pattern covers, naming it."""
    sites: list[Site] = []
    for path, module in model.named_modules():
        if any(path == s.path or path.startswith(s.path + ".") for s in sites):
            continue  # inside a matched FFN
        pattern = next((p for p in PATTERNS if _matches(module, p)), None)
        if pattern is None:
            continue
        where = f"{path} ({type(module).__name__})"
        activation = (UNKNOWN_ACTIVATION if pattern.act is None
                      else identify_activation(get_path(module, pattern.act), where))
        if isinstance(pattern, Experts):
            units = pattern.shapes(getattr(module, pattern.gate_up), getattr(module, pattern.down))[1]
        elif isinstance(pattern, Gated):
            units = out_features(get_path(module, pattern.fused)) // 2 if pattern.fused else out_features(get_path(module, pattern.up))
        else:
            units = out_features(get_path(module, pattern.up))
        sites.append(Site(path, pattern, activation, is_causal_site(path, causal, encoder_decoder), units))
    _refuse_unknown_ffns(model, sites)
    return sites


def _refuse_unknown_ffns(model: nn.Module, sites: list[Site]) -> None:
    for path, module in model.named_modules():
        if not FFN_LIKE.search(type(module).__name__):
            continue
        related = any(path == s.path or path.startswith(s.path + ".") or s.path.startswith(path + ".") or
                      any(s.join(p).startswith(path + ".") for p in _paths(s.pattern)) for s in sites)
        if not related:
            raise UnsupportedArchitectureError(
                f"{path} ({type(module).__name__}) looks like an FFN but matches no known pattern "
                f"(its children: {', '.join(n for n, _ in module.named_children()) or 'none'}); see GET /v1/architectures")


def candidate_activations(site: Site) -> tuple[str, ...]:
    """Activations the verification tries for a site (all buildable ones when none is named)."""
    return ACTIVATIONS if site.activation == UNKNOWN_ACTIVATION else (site.activation,)


def _paths(pattern) -> list[str]:
    return [v for v in (getattr(pattern, k, None) for k in ("act", "up", "down", "gate", "fused")) if isinstance(v, str)]


TABLE_FILE = Path(__file__).with_name("architectures.json")  # made by tools/make_architectures_table.py


def describe_patterns() -> list[dict]:
    """The registry as rows, for `attnonly architectures` and GET /v1/architectures."""
    rows = []
    for p in PATTERNS:
        fields = {k: getattr(p, k) for k in ("act", "gate", "up", "fused", "gate_up", "down") if getattr(p, k, None)}
        if getattr(p, "transposed", False):
            fields["layout"] = "gate_up (E, D, 2F), down (E, F, D)"
        rows.append({"kind": p.kind, **fields})
    return rows


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = float(ref.abs().max())
    return float((ours.double() - ref).abs().max()) / scale if scale > 0 else (0.0 if ours.abs().max() == 0 else math.inf)


def remaining_ffns(model: nn.Module) -> list[str]:
    """Paths of modules where an FFN pattern still matches: empty for a fully converted model."""
    return [f"{path} ({type(module).__name__})" for path, module in model.named_modules()
            if any(_matches(module, p) for p in PATTERNS)]
