"""Before any weights are read (or downloaded): can this model be converted, and what will it
cost? From config.json alone: the class is built on the meta device, its FFNs recognised (an
unknown FFN or activation is refused here, in seconds), and memory and disk are estimated.

    estimate = preflight(directory, options, memory_budget=20 * 2**30, disk_budget=100 * 2**30)
"""
from dataclasses import asdict, dataclass

import torch

from . import host
from .errors import TooLargeForWorkerError, UnsupportedArchitectureError
from .format import TORCH_DTYPES
from .options import ConversionOptions
from .patterns import find_sites

_BYTES = {torch.float64: 8, torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass
class Estimate:
    parameters: int
    largest_module_bytes: int  # in the compute dtype
    peak_memory_bytes: int
    disk_bytes: int
    ffn_sites: int

    def to_dict(self) -> dict:
        return asdict(self)


def _storage_dtype(config) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(name).replace("torch.", "") if name is not None else "float32"
    return TORCH_DTYPES.get(name, torch.float32)


def estimate(directory, options: ConversionOptions) -> Estimate:
    config = host.load_config(directory)
    cls = host.model_class(config)
    compute = TORCH_DTYPES[options.dtype]
    model = host.build_empty(cls, config, compute)
    sites = find_sites(model, causal=host.is_causal(cls, config),
                       encoder_decoder=host.is_encoder_decoder(cls, config))
    if not sites:
        raise UnsupportedArchitectureError(f"{cls.__name__} has no FFN that any known pattern matches")
    sizes = {id(p): p.numel() for p in model.parameters()}
    parameters = sum(sizes.values())
    per_module = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    largest = max(per_module) * _BYTES[compute]
    site_params = max(sum(p.numel() for p in model.get_submodule(s.path).parameters()) for s in sites)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = max(int(getattr(text, "hidden_size", 0) or 0), 1)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or len(sites))
    tokens = max(options.calibration_tokens, 2 * options.seq_len)
    ffn_width = max(s.units for s in sites)
    # activations: hidden states of every layer for both models in the checks, the logits in
    # float64, and one site's inputs and outputs in float64
    activations = (2 * (layers + 1) * 2 * options.seq_len * width * _BYTES[compute]
                   + 3 * 2 * options.seq_len * vocab * 8 + 6 * tokens * max(ffn_width, width) * 8)
    # a module's tensors as read and as cast, one site's modules in float64 twice (reference and
    # reconstruction) and in the compute dtype, plus the allocator's slack
    peak = int(1.25 * (3 * largest + site_params * (2 * 8 + _BYTES[compute]) + activations))
    source_bytes = parameters * _BYTES[_storage_dtype(config)]
    heads = sum(s.units * 8 for s in sites) * 4  # a, c, g (a few terms), eps: float32
    return Estimate(parameters, largest, peak, source_bytes * 2 + heads, len(sites))


def preflight(directory, options: ConversionOptions, memory_budget: int | None = None,
              disk_budget: int | None = None, found: Estimate | None = None) -> Estimate:
    """The estimate, or TooLargeForWorkerError when it exceeds a budget. ``found``: an estimate
    made earlier for the same config.json and options (the budgets are checked again)."""
    found = found or estimate(directory, options)
    for what, need, budget in (("memory", found.peak_memory_bytes, memory_budget),
                               ("disk", found.disk_bytes, disk_budget)):
        if budget is not None and need > budget:
            raise TooLargeForWorkerError(
                f"this conversion needs about {need / 2**30:.1f} GiB of {what} ({found.parameters / 1e9:.2f}B parameters, "
                f"largest module {found.largest_module_bytes / 2**20:.0f} MiB in {options.dtype}); "
                f"the worker's {what} budget is {budget / 2**30:.1f} GiB")
    return found
