"""Hosting: the source's own transformers class, built without weights, with its FFNs swapped
for attention-head modules, and its weights loaded all at once or module by module.

    build_empty(config, dtype)        the class on the meta device (no memory for weights)
    swap_in(model, plans, context)    every planned FFN replaced by head modules (modules.py)
    materialize(model, weights)       load every tensor now (small models, users' default)
    offload(model, weights)           accelerate's hooks load each module's tensors as it runs
"""
import copy

import torch
import torch.nn as nn
import transformers
from accelerate import cpu_offload, init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from .errors import UnsupportedArchitectureError
from .modules import DecodeContext, GatedHeads, HeadExperts, NeuronHeads, ProductHeads, SquaredHeads
from .patterns import Experts, Gated, Plain, Site

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
    return model.eval()


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
                experts, _, d_model = getattr(module, pattern.gate_up).shape
                _set(model, site.path, HeadExperts(experts, site.units, d_model, plan["heads_per_unit"]))


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


def offload(model: nn.Module, weights) -> nn.Module:
    """accelerate's CPU offload: each module's tensors are read from `weights` (and cast to the
    model's dtype) just before it runs and dropped after, so a forward pass holds one module."""
    missing = [n for n in model.state_dict().keys() if n not in weights]
    assert not missing, f"weights lack {missing[:5]}"
    return cpu_offload(model, execution_device=torch.device("cpu"), state_dict=weights)
