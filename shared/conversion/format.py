"""The converted checkpoint on disk (spec: docs/FORMAT.md).

    config.json        format name/version, source identity, construction, every layer's sublayers
    model.safetensors  factored weights: W1, b1, W2, b2 (or gate/up/down) plus per-head a, c, g
    report.json        the equivalence report

The safetensors file is written incrementally: the header is computed from the planned
shapes first, then tensors are streamed in one at a time, so writing never holds the model.
"""
import json
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InvalidConvertedCheckpointError

FORMAT_NAME = "attention-only-transformer"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE = "config.json", "model.safetensors", "report.json"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}

_GATED_RENAMES = (
    (re.compile(r"^(layers\.\d+\.)ffn\.gate\."), r"\1gate.gate."),
    (re.compile(r"^(layers\.\d+\.)ffn\.up\."), r"\1product.up."),
    (re.compile(r"^(layers\.\d+\.)ffn\.down\."), r"\1product.down."),
)


def runtime_name(canonical: str) -> str:
    """Where a canonical source tensor lives in the runtime's state dict."""
    if canonical in ("embed.tokens", "embed.positions", "embed.token_types"):
        return canonical + ".weight"
    for pattern, replacement in _GATED_RENAMES:
        canonical = pattern.sub(replacement, canonical)
    return canonical


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple]], metadata: dict | None = None):
        self.path, self.layout = Path(path), layout
        header, offset = {}, 0
        for name, (dtype, shape) in layout.items():
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the data section 8-byte aligned
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.pending = list(layout)

    def write(self, name: str, tensor: torch.Tensor):
        assert self.pending and self.pending[0] == name, f"expected {self.pending[:1]}, got {name}"
        dtype, shape = self.layout[name]
        assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), (name, tensor.dtype, tensor.shape)
        self.file.write(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().data)
        self.pending.pop(0)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """Close the file; a writer that left no error behind must have written every tensor."""
        self.file.close()
        if exc_type is None:
            assert not self.pending, f"tensors never written: {self.pending[:5]}"


def read_config(directory) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InvalidConvertedCheckpointError(f"{path} is missing: not a converted checkpoint")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidConvertedCheckpointError(f"{path} is not valid JSON: {exc}") from None
    if config.get("format") != FORMAT_NAME:
        raise InvalidConvertedCheckpointError(f"{path} is not a {FORMAT_NAME} config (format={config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise InvalidConvertedCheckpointError(
            f"format version {config.get('format_version')} is not readable by this runtime (reads {FORMAT_VERSION})"
        )
    return config


def read_weights(directory) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise InvalidConvertedCheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own error types for every kind of corruption
        raise InvalidConvertedCheckpointError(f"{path} cannot be read: {exc}") from None
