"""load_converted(): a converted directory -> a ready ConvertedModel. Needs neither the source
model, nor transformers, nor the converter: config.json + model.safetensors only."""
import torch

from .errors import InvalidConvertedCheckpointError
from .format import TORCH_DTYPES, read_config, read_weights
from .model import ConvertedModel


def load_converted(path, device=None, head_impl: str = "fast") -> ConvertedModel:
    config = read_config(path)
    dtype = TORCH_DTYPES.get(config.get("dtype"))
    if dtype is None:
        raise InvalidConvertedCheckpointError(f"unknown dtype {config.get('dtype')!r} in config.json")
    try:
        model = ConvertedModel(config)
    except (KeyError, TypeError, AssertionError) as exc:
        raise InvalidConvertedCheckpointError(f"config.json does not describe a valid model: {exc!r}") from None
    model.to(dtype)
    weights = read_weights(path)
    expected = dict(model.state_dict())
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise InvalidConvertedCheckpointError(f"weights do not match config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise InvalidConvertedCheckpointError(f"{name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}")
    model.load_state_dict(weights)
    model.set_head_impl(head_impl)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()
