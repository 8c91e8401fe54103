"""Hosting: the source's own transformers class, built without weights, with its FFNs swapped
for attention-head modules, and its weights loaded all at once or module by module.

    build_empty(config, dtype)        the class on the meta device (no memory for weights)
    swap_in(model, plans, context)    every planned FFN replaced by head modules (modules.py)
    materialize(model, weights)       load every tensor now (small models, users' default)
    offload(model, weights, device)   accelerate's hooks load each module's tensors onto device as it runs
"""
import copy
import functools
import inspect
import re

import torch
import torch.nn as nn
import transformers
from accelerate import cpu_offload, init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import set_module_tensor_to_device

from .errors import UnsupportedArchitectureError
from .modules import DecodeContext, GatedHeads, HeadExperts, NeuronHeads, ProductHeads, SquaredHeads
from .patterns import PATTERNS, Experts, Gated, Plain, Site, get_path, is_activation, is_projection

_AUTO_ORDER = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel")


def load_config(directory) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError):
        import json
        from pathlib import Path

        raw = json.loads((Path(directory) / "config.json").read_text())
        named = ", ".join(raw.get("architectures") or []) or "the model"
        raise UnsupportedArchitectureError(
            f"{named} (model_type {raw.get('model_type')!r}) is not a model type transformers "
            f"{transformers.__version__} knows, so it has no class to host the conversion") from None


def model_class(config: transformers.PretrainedConfig):
    """The class named in config.architectures when transformers has it, else the first Auto
    class that maps the config's model type."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for auto in _AUTO_ORDER:
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise UnsupportedArchitectureError(f"transformers has no model class for model_type {config.model_type!r}")


def is_causal(cls, config) -> bool:
    """Whether the model's (decoder) FFNs see a causal mask: causal LMs and decoders."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # names: no import of every model module
    return cls.__name__ in causal_names or bool(getattr(config, "is_decoder", False)) or cls.__name__.endswith("ForCausalLM")


def is_encoder_decoder(cls, config) -> bool:
    """An encoder-decoder model; a causal LM built from an encoder-decoder's config (BartForCausalLM)
    is a decoder alone."""
    return bool(getattr(config, "is_encoder_decoder", False)) and not cls.__name__.endswith("ForCausalLM")


def build_empty(cls, config, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device (buffers such as rotary frequencies stay real)."""
    config = copy.deepcopy(config)
    if dtype == torch.float64:  # grouped-GEMM expert kernels take no float64: use the plain loop
        for sub in (config, config.get_text_config()):
            sub._experts_implementation = "eager"
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    own_activations(model)
    return model.eval()


class CalledActivation(nn.Module):
    """An activation a module keeps as a plain function (XLM's `self.act = gelu`), as a module: a
    Plain row can then match it, the calibration hook it, and swap_in replace it like any other."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def own_activations(model: nn.Module) -> None:
    """Give every Plain row's activation slot a module of this model and site alone: swap_in
    replaces it by that site's heads and the calibration hooks it. A function attribute is wrapped
    (CalledActivation); a module is copied, since transformers may share one instance between
    layers and even between models (openai-gpt's and XLM's module-level activations), where a
    hook on one model's would fire in another's. Both are parameter-free, so the model computes
    exactly what it did."""
    for parent in list(model.modules()):
        for pattern in PATTERNS:
            if not (isinstance(pattern, Plain) and
                    all(is_projection(get_path(parent, n)) for n in (pattern.up, pattern.down))):
                continue
            owner_path, _, name = pattern.act.rpartition(".")
            owner = get_path(parent, owner_path) if owner_path else parent
            if not isinstance(owner, nn.Module):
                continue
            act = owner._modules.get(name, owner.__dict__.get(name))  # a child module, or a plain attribute
            if is_activation(act):
                setattr(owner, name, copy.deepcopy(act))
            elif callable(act) and not isinstance(act, nn.Module):
                setattr(owner, name, CalledActivation(act))


def _set(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def swap_in(model: nn.Module, sites: list[Site], plans: list[dict], context: DecodeContext | None) -> None:
    """Replace each site's FFN by its head modules, on the meta device (weights come later)."""
    for site, plan in zip(sites, plans):
        module = model.get_submodule(site.path)
        pattern = site.pattern
        with torch.device("meta"):
            if isinstance(pattern, Plain):
                _set(model, site.join(pattern.act), plain_heads(site, plan, context))
            elif isinstance(pattern, Gated):
                names = [n for n in (pattern.gate, pattern.up, pattern.down, pattern.fused) if n]
                projections = {n: module.get_submodule(n) for n in names}
                gate = NeuronHeads(plan["heads_per_unit"], site.units, plan["omega"], site.causal, context)
                product = ProductHeads(site.units, plan["product_omega"], site.causal, context)
                _set(model, site.path, GatedHeads(projections, pattern.gate, pattern.up, pattern.down, pattern.fused,
                                                  gate, product))
            elif isinstance(pattern, Experts):
                experts, _, d_model = pattern.shapes(getattr(module, pattern.gate_up), getattr(module, pattern.down))
                _set(model, site.path, HeadExperts(experts, site.units, d_model, plan["heads_per_unit"], pattern.transposed))


def plain_heads(site: Site, plan: dict, context: DecodeContext | None) -> nn.Module:
    """What takes a plain FFN's activation's place: neuron heads, or for squared ReLU gate heads and product pairs."""
    heads = NeuronHeads(plan["heads_per_unit"], site.units, plan["omega"], site.causal, context)
    if site.activation != "relu2":
        return heads
    return SquaredHeads(heads, ProductHeads(site.units, plan["product_omega"], site.causal, context))


def head_module_names(site: Site) -> str:
    """Where a site's head parameters live, relative to the model."""
    if isinstance(site.pattern, Plain):
        return site.join(site.pattern.act)
    return site.path


def materialize(model: nn.Module, weights, skip_missing_buffers: bool = True) -> nn.Module:
    """Load every parameter (and persistent buffer) from `weights`, cast to the model's dtype."""
    buffers = {n for n, _ in model.named_buffers()}
    for name in model.state_dict().keys():
        if name in weights:
            set_module_tensor_to_device(model, name, "cpu", value=weights[name])
        elif not (skip_missing_buffers and name in buffers):
            raise KeyError(name)
    return model


def offload(model: nn.Module, weights, device: torch.device) -> nn.Module:
    """accelerate's CPU offload: each module's tensors are read from `weights` (CPU memory, cast to
    the model's dtype), moved to `device` just before the module runs and dropped after, so a
    forward pass holds one module there; every module computes on `device` (buffers are moved
    there once). The model's outputs come back on the device its inputs came from."""
    missing = [n for n in model.state_dict().keys() if n not in weights]
    assert not missing, f"weights lack {missing[:5]}"
    model = cpu_offload(model, execution_device=device, state_dict=weights,
                        preload_module_classes=_preloaded_classes(model))
    for path in read_outside_their_call(model):
        child = model.get_submodule(path)
        remove_hook_from_module(child)
        for name, _ in list(child.named_parameters(recurse=False)):
            set_module_tensor_to_device(model, f"{path}.{name}", device, value=weights[f"{path}.{name}"])
    return model


# `self.<child path>.weight` (or .bias) in a method's source: the method reads a child's tensor itself;
# `self.<child path>._forward(` (a private method, prophetnet's positions): the child runs without its hook
_TENSOR_READ = re.compile(r"self\.([A-Za-z_][\w.]*?)\.(?:weight\b|bias\b|_[a-z]\w*\()")
_NOT_RUN_IN_A_PASS = ("__init__", "_init_weights", "tie_weights", "get_", "set_", "_tie")


def read_outside_their_call(model: nn.Module) -> list[str]:
    """Modules whose tensors another method reads directly, without calling the module (llama4
    and gemma4 read embed_tokens.weight, prophetnet its ngram embeddings, reformer's LSH attention
    its query_key.weight): under offload hooks those tensors are meta placeholders except while
    the module itself runs, so these stay loaded for the whole pass. Found in the classes' source."""
    found = set()
    for path, module in model.named_modules():
        for dotted in _tensor_reads(type(module)):
            child = get_path(module, dotted)
            if isinstance(child, nn.Module) and any(True for _ in child.parameters(recurse=False)):
                found.add(f"{path}.{dotted}" if path else dotted)
    return sorted(found)


@functools.cache
def _tensor_reads(cls) -> tuple[str, ...]:
    reads = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch.", "accelerate.")) or klass is object:
            continue
        for name, function in vars(klass).items():
            if not callable(function) or name.startswith(_NOT_RUN_IN_A_PASS):
                continue
            try:
                reads.update(_TENSOR_READ.findall(inspect.getsource(function)))
            except (OSError, TypeError):
                continue
    return tuple(sorted(reads))


def _preloaded_classes(model: nn.Module) -> list[str]:
    """Classes whose parameters sit in a child that is never called (a ParameterList or
    ParameterDict, read by the parent's forward: reformer's axial position embeddings): a hook
    only loads a module's tensors when that module runs, so these load their children's too."""
    return sorted({type(m).__name__ for m in model.modules()
                   if any(isinstance(c, (nn.ParameterList, nn.ParameterDict)) for c in m.children())})
