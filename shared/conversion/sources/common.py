"""Small helpers shared by the family readers."""
from ..errors import InvalidConfigError, UnsupportedArchitectureError


def require(config: dict, *keys, kind=int):
    """The first of `keys` present in config, checked for type: a clear error beats a KeyError."""
    for key in keys:
        if config.get(key) is not None:
            value = config[key]
            if kind is int and isinstance(value, bool) or not isinstance(value, (kind, int) if kind is float else kind):
                raise InvalidConfigError(f"config.json field {key!r} must be {kind.__name__}, not {value!r}")
            if kind is int and value <= 0:
                raise InvalidConfigError(f"config.json field {key!r} must be positive, not {value}")
            return value
    raise InvalidConfigError(f"config.json lacks {' / '.join(keys)}")


def activation_name(raw: str) -> str:
    """Map transformers' activation names onto the constructions we build."""
    names = {
        "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
        "gelu": "gelu_erf", "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu",
    }
    if raw not in names:
        raise UnsupportedArchitectureError(
            f"activation {raw!r} is not supported; supported: {', '.join(sorted(names))}"
        )
    return names[raw]


def transpose(t):
    return t.t()


def identity(t):
    return t


def rows(start: int, stop: int, then=identity):
    return lambda t: then(t[start:stop])


def columns(start: int, stop: int, then=identity):
    return lambda t: then(t[:, start:stop])


def strip_prefix(names, candidates):
    """The prefix under which this checkpoint stores its backbone ('transformer.', 'bert.', '')."""
    for prefix in candidates:
        if any(n.startswith(prefix) for n in names):
            return prefix
    return ""
