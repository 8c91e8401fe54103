"""A model's state dict as a lazy mapping over checkpoint files: name -> tensor, read on access.

accelerate's offload hooks take such a mapping and load each module's tensors just before the
module runs (and drop them after), so a forward pass holds one module's weights at a time;
tensors are read from memory-mapped safetensors files, not held.

State-dict names are found in the checkpoint as they are, with the model's base prefix added
or dropped (a headless checkpoint in an LM class, or the reverse), or through the model's tied
weights. A checkpoint that needs transformers' own key conversions (for instance experts stored
one by one where the class fuses them) is loaded whole through transformers instead, in its
storage dtype: correct, but not bounded by one layer.
"""
from collections.abc import Mapping

import torch
import torch.nn as nn

from .checkpoint import SourceCheckpoint
from .errors import ShapeMismatchError


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """name -> the first name of the same tensor, for every state-dict entry that repeats one."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def declared_ties(model: nn.Module) -> dict[str, str]:
    """transformers' own tie declarations (target -> source), for models built on meta where the
    tie itself may not be visible."""
    declared = getattr(model, "_tied_weights_keys", None)
    if isinstance(declared, dict) and getattr(model.config, "tie_word_embeddings", True):
        return dict(declared)
    return {}


class LazyWeights(Mapping):
    """State-dict name -> tensor in the checkpoint's own dtype, read when asked for."""

    def __init__(self, checkpoint: SourceCheckpoint, names: dict[str, str], extra: dict[str, torch.Tensor] | None = None):
        self.checkpoint, self.names, self.extra = checkpoint, names, extra or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        return self.checkpoint.tensor(self.names[name])

    def __iter__(self):
        yield from self.names
        yield from (n for n in self.extra if n not in self.names)

    def __len__(self) -> int:
        return len(set(self.names) | set(self.extra))

    def info(self, name: str) -> tuple[torch.dtype, tuple]:
        """(dtype, shape) without reading the tensor."""
        if name in self.extra:
            return self.extra[name].dtype, tuple(self.extra[name].shape)
        return self.checkpoint.info(self.names[name])

    def with_extra(self, extra: dict[str, torch.Tensor]) -> "LazyWeights":
        return LazyWeights(self.checkpoint, self.names, {**self.extra, **extra})


class LoadedWeights(Mapping):
    """The fallback: a state dict loaded whole through transformers (its key conversions applied)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __getitem__(self, name):
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def info(self, name):
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def with_extra(self, extra):
        return LoadedWeights({**self.tensors, **extra})


def map_names(model: nn.Module, checkpoint: SourceCheckpoint) -> dict[str, str] | None:
    """state-dict name -> checkpoint name for every entry the model needs, or None when some
    cannot be found without transformers' key conversions."""
    wanted = list(model.state_dict().keys())
    available = set(checkpoint.names())
    prefix = getattr(model, "base_model_prefix", "") or ""
    ties = {**declared_ties(model), **tied_aliases(model)}
    buffers = {n for n, _ in model.named_buffers()}
    found = {}
    for name in wanted:
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        hit = next((c for c in candidates if c in available), None)
        if hit is not None:
            found[name] = hit
    for name in wanted:
        if name not in found and ties.get(name) in found:
            found[name] = found[ties[name]]
    missing = [n for n in wanted if n not in found and n not in buffers]
    return None if missing else found


def source_weights(model: nn.Module, checkpoint: SourceCheckpoint, model_class, storage_dtype: torch.dtype):
    """(weights mapping for `model`'s state dict, whether it is lazy); every tensor the model
    needs present, with the shape the config implies."""
    names = map_names(model, checkpoint)
    if names is not None:
        weights = LazyWeights(checkpoint, names)
        _check_shapes(model, weights)
        return weights, True
    try:
        loaded, info = model_class.from_pretrained(str(checkpoint.directory), dtype=storage_dtype, output_loading_info=True)
    except (RuntimeError, ValueError) as exc:  # size mismatches and the like
        raise ShapeMismatchError(f"the checkpoint does not fit its config: {str(exc)[:500]}") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ShapeMismatchError(f"the checkpoint lacks tensors its config implies, e.g. "
                                 f"{sorted(info.get('missing_keys') or info.get('mismatched_keys'))[:5]}")
    return LoadedWeights({k: v.detach() for k, v in loaded.state_dict().items()}), False


def _check_shapes(model: nn.Module, weights: LazyWeights) -> None:
    expected = model.state_dict()
    for name in weights.names:
        shape = weights.info(name)[1]
        if shape != tuple(expected[name].shape):
            raise ShapeMismatchError(f"{weights.names[name]} has shape {shape} but the config implies "
                                     f"{tuple(expected[name].shape)} for {name}")
