"""The converted checkpoint on disk (spec: docs/FORMAT.md): a Hugging Face directory.

    config.json        the source's config, plus an "attention_only" section: format version,
                       dtypes, calibration, and the plan of every FFN site
    model.safetensors  the source's tensors under their own names and in their own dtype, plus
                       each site's head parameters (float32); sharded with
                       model.safetensors.index.json beyond max_shard_bytes
    report.json        the equivalence report
    tokenizer files    copied from the source

Safetensors files are written incrementally: the header is computed from the planned names,
dtypes and shapes first, then tensors are streamed in one at a time.
"""
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InvalidConvertedCheckpointError

FORMAT_NAME = "attention-only"
FORMAT_VERSION = 2
SECTION = "attention_only"  # the key of our section in config.json
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, REPORT_FILE = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "report.json")
# integer and bool tensors (index tables such as deepseek_v4's) are written as the source had them
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                   "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")


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


def nbytes(dtype: torch.dtype, shape) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Write tensors in a fixed order into shards of at most max_shard_bytes (one file named
    model.safetensors when everything fits, else model-0000i-of-0000n.safetensors plus the index).
    `layout` maps name -> (dtype, shape) in writing order; the files appear as they are filled."""

    def __init__(self, directory: Path, layout: dict[str, tuple[torch.dtype, tuple]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        shards, current, size = [], {}, 0
        for name, (dtype, shape) in layout.items():
            n = nbytes(dtype, shape)
            if current and size + n > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = (dtype, shape)
            size += n
        shards.append(current)
        count = len(shards)
        self.files = [WEIGHTS_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards, self.total = shards, sum(nbytes(d, s) for d, s in layout.values())
        self.current, self.writer = -1, None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.writer is None or name not in self.shards[self.current]:
            self._next()
        self.writer.write(name, tensor)

    def _next(self):
        if self.writer is not None:
            self.writer.__exit__(None, None, None)
        self.current += 1
        path = self.directory / self.files[self.current]
        self.writer = StreamingSafetensorsWriter(path, self.shards[self.current], metadata={"format": "pt"})

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            assert self.current == len(self.shards) - 1, "shards never written"
            if len(self.files) > 1:
                weight_map = {name: self.files[i] for i, shard in enumerate(self.shards) for name in shard}
                (self.directory / INDEX_FILE).write_text(json.dumps(
                    {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def read_config(directory) -> dict:
    """config.json of a converted directory; its attention_only section is checked."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InvalidConvertedCheckpointError(f"{path} is missing: not a converted checkpoint")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidConvertedCheckpointError(f"{path} is not valid JSON: {exc}") from None
    if config.get("format") == "attention-only-transformer":
        raise InvalidConvertedCheckpointError(
            f"{path} is format version {config.get('format_version')} (the standalone runtime of earlier releases), "
            f"which this release no longer reads; convert the source again to get version {FORMAT_VERSION}")
    section = config.get(SECTION)
    if not isinstance(section, dict) or section.get("format") != FORMAT_NAME:
        raise InvalidConvertedCheckpointError(f"{path} has no {SECTION!r} section: not a converted checkpoint")
    if section.get("format_version") != FORMAT_VERSION:
        raise InvalidConvertedCheckpointError(
            f"format version {section.get('format_version')} is not readable by this release (reads {FORMAT_VERSION})")
    return config


REMOTE_CODE_FILE = "modeling_attention_only.py"
_AUTO_CLASSES = {"AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                 "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModel": "MODEL_MAPPING_NAMES"}


def remote_code(model_class: type, config_class: type) -> tuple[str, dict]:
    """(the text of modeling_attention_only.py, the config's auto_map) that let transformers' Auto
    classes load the converted directory with trust_remote_code=True. The file holds no model
    code: it hands the directory to this package's load_converted, which must be installed."""
    from transformers.models.auto import modeling_auto

    name = f"AttentionOnly{model_class.__name__}"
    source = f'''"""Loads this attention-only checkpoint through transformers' Auto classes:
    AutoModel...from_pretrained(directory, trust_remote_code=True)
The heads live in the attnonly package (shared.conversion), which must be importable."""
from transformers import {config_class.__name__}, {model_class.__name__}


class {name}({model_class.__name__}):
    config_class = {config_class.__name__}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from shared.conversion import load_converted

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        name = str(dtype).replace("torch.", "") if dtype not in (None, "auto") else None
        return load_converted(pretrained_model_name_or_path, dtype=name)
'''
    auto = {}
    for auto_name, mapping in _AUTO_CLASSES.items():
        if model_class.__name__ in getattr(modeling_auto, mapping).values():
            auto[auto_name] = f"modeling_attention_only.{name}"
    auto.setdefault("AutoModel", f"modeling_attention_only.{name}")
    return source, auto
