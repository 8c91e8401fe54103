"""load_converted(): a converted directory -> the source's transformers class with attention-head
modules where its FFNs were. Needs transformers and this package; not the source checkpoint.

    model = load_converted("out/")                  # every tensor loaded now
    model = load_converted("out/", layerwise=True)  # each module's tensors loaded as it runs
    model = load_converted("out/", device="cuda", layerwise=True)  # ... onto the GPU, where it computes
    model.generate(input_ids, max_new_tokens=32)    # transformers' own generate()
"""
import torch

from . import host
from .checkpoint import SourceCheckpoint
from .errors import InvalidConvertedCheckpointError
from .format import SECTION, TORCH_DTYPES, read_config
from .modules import DecodeContext
from .patterns import Site, find_sites
from .weights import LazyWeights, map_names


def load_converted(path, device=None, dtype: str | None = None, layerwise: bool = False, head_impl: str = "fast",
                   construction: str | None = None):
    """The converted model in `dtype` (default: the compute dtype it was converted and checked in), in
    the construction it was converted with, or "compact" (an explicit directory holds both forms),
    computing on `device` (default: the CPU). layerwise: the weights stay in CPU memory and each
    module's move to `device` as it runs."""
    config_dict = read_config(path)
    section = config_dict[SECTION]
    config = host.load_config(path)
    cls = host.model_class(config)
    compute = TORCH_DTYPES[dtype or section["compute_dtype"]]
    model = host.build_empty(cls, config, compute)
    encoder_decoder = host.is_encoder_decoder(cls, config)
    sites = find_sites(model, causal=host.is_causal(cls, config), encoder_decoder=encoder_decoder)
    plans = section["sites"]
    if [s.path for s in sites] != [p["path"] for p in plans]:
        raise InvalidConvertedCheckpointError(
            f"config.json plans FFN sites {[p['path'] for p in plans][:3]}… but {cls.__name__} has {[s.path for s in sites][:3]}…")
    context = DecodeContext(use_mask=not encoder_decoder)
    construction = construction or section.get("construction", "compact")
    if construction == "explicit":
        from .explicit_build import swap_in as swap_in_explicit

        swap_in_explicit(model, sites, plans, context)
    elif construction == "compact":
        host.swap_in(model, sites, plans, context)
    else:
        raise InvalidConvertedCheckpointError(f"construction {construction!r} is neither compact nor explicit")
    context.install(model)
    checkpoint = SourceCheckpoint(path)
    names = map_names(model, checkpoint)
    if names is None:
        raise InvalidConvertedCheckpointError(f"the weights in {path} do not cover {cls.__name__}'s tensors")
    weights = LazyWeights(checkpoint, names)
    if layerwise:
        model = host.offload(model, weights, torch.device(device or "cpu"))
    else:
        model = host.materialize(model, weights)
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = head_impl
    model.attention_only = section
    if not layerwise and device is not None:
        model = model.to(device)
    return model.eval()


def site_tensors(path, site: Site) -> dict[str, torch.Tensor]:
    """A site's head parameters as stored, by their names relative to the head module."""
    checkpoint = SourceCheckpoint(path)
    prefix = host.head_module_names(site) + "."
    keep = ("a", "c", "g", "eps", "gate_heads.a", "gate_heads.c", "gate_heads.g", "product.eps")
    return {n[len(prefix):]: checkpoint.tensor(n) for n in checkpoint.names()
            if n.startswith(prefix) and n[len(prefix):] in keep}
