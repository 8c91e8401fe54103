"""Reading a Hugging Face model directory: config.json plus its weight files.

Tensors are read lazily, one at a time, from memory-mapped safetensors files, so a
conversion never has to hold the whole source in memory.
"""
import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import (
    CorruptWeightsError,
    InvalidConfigError,
    MissingFileError,
    PickleNotAllowedError,
)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 2**20


class SourceCheckpoint:
    """config.json + tensors by their Hugging Face names."""

    def __init__(self, directory, allow_pickle: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise MissingFileError(f"source directory {self.directory} does not exist")
        self.config = self._read_config()
        self.weight_files = self._find_weight_files(allow_pickle)
        self._location = {}  # hf tensor name -> weight file
        self._pickled = None
        for path in self.weight_files:
            for name in self._names_in(path):
                self._location[name] = path

    # --- reading -----------------------------------------------------------
    def _read_config(self) -> dict:
        path = self.directory / "config.json"
        if not path.is_file():
            raise MissingFileError(f"config.json is missing from {self.directory}")
        try:
            config = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidConfigError(f"config.json is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidConfigError("config.json must hold a JSON object")
        return config

    def _find_weight_files(self, allow_pickle: bool) -> list[Path]:
        single = self.directory / SAFETENSORS_FILE
        index = self.directory / SAFETENSORS_INDEX
        if single.is_file():
            return [single]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as exc:
                raise CorruptWeightsError(f"{SAFETENSORS_INDEX} is not a valid index: {exc}") from None
            shards = []
            for shard in dict.fromkeys(weight_map.values()):
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise CorruptWeightsError(f"index names an unsafe shard file {shard!r}")
                path = self.directory / shard
                if not path.is_file():
                    raise MissingFileError(f"shard {shard} named by {SAFETENSORS_INDEX} is missing")
                shards.append(path)
            return shards
        pickled = self.directory / PICKLE_FILE
        if pickled.is_file():
            if not allow_pickle:
                raise PickleNotAllowedError(
                    f"{PICKLE_FILE} is a pickle; loading pickles is disabled (allow_pickle is off). "
                    "Convert it to safetensors or enable pickle loading explicitly."
                )
            return [pickled]
        raise MissingFileError(
            f"no weights in {self.directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PICKLE_FILE}"
        )

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".bin":
            return list(self._load_pickle(path).keys())
        check_safetensors_file(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for every corruption
            raise CorruptWeightsError(f"{path.name} is not a readable safetensors file: {exc}") from None

    def _load_pickle(self, path: Path) -> dict:
        if self._pickled is None:
            try:
                self._pickled = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CorruptWeightsError(f"{path.name} could not be loaded with weights_only=True: {exc}") from None
        return self._pickled

    # --- access ------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._location)

    def has(self, name: str) -> bool:
        return name in self._location

    def tensor(self, name: str) -> torch.Tensor:
        path = self._location.get(name)
        if path is None:
            raise MissingFileError(f"tensor {name!r} is missing from the checkpoint")
        if path.suffix == ".bin":
            return self._load_pickle(path)[name]
        try:
            # open per tensor: a handle kept open keeps every page it touched mapped,
            # which would count the whole source against the conversion's memory
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise CorruptWeightsError(f"tensor {name!r} in {path.name} cannot be read: {exc}") from None

    def info(self, name: str) -> tuple[torch.dtype, tuple]:
        """(dtype, shape) of a tensor, from the file's header."""
        path = self._location.get(name)
        if path is None:
            raise MissingFileError(f"tensor {name!r} is missing from the checkpoint")
        if path.suffix == ".bin":
            tensor = self._load_pickle(path)[name]
            return tensor.dtype, tuple(tensor.shape)
        with safe_open(str(path), framework="pt") as f:
            piece = f.get_slice(name)
            return _SAFETENSORS_DTYPES[piece.get_dtype()], tuple(piece.get_shape())

    def weights_sha256(self) -> str:
        """A hash over the weight files' bytes, in name order, recorded in the converted config."""
        digest = hashlib.sha256()
        for path in sorted(self.weight_files):
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)


def check_safetensors_file(path: Path) -> None:
    """Cheap structural check before mmap: the declared data section must fit in the file.

    safetensors would otherwise fail late, in the middle of a conversion, on a truncated file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptWeightsError(f"{path.name} is truncated: {size} bytes, no header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise CorruptWeightsError(f"{path.name} declares a {header_len}-byte header but holds {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptWeightsError(f"{path.name} has a header that is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{path.name} has a header that is not a JSON object")
    data_len = size - 8 - header_len
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end > data_len:
        raise CorruptWeightsError(
            f"{path.name} is truncated: tensors need {end} data bytes, the file holds {data_len}"
        )


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SAFETENSORS_DTYPES = {**_SAFETENSORS_FLOATS, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def storage_dtype(checkpoint: SourceCheckpoint) -> torch.dtype:
    """The floating dtype that holds most of the checkpoint's elements: what the converted
    checkpoint keeps for the source's tensors."""
    counts: dict[torch.dtype, int] = {}
    for path in checkpoint.weight_files:
        if path.suffix == ".bin":
            for tensor in checkpoint._load_pickle(path).values():
                if tensor.is_floating_point():
                    counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = _SAFETENSORS_FLOATS.get(piece.get_dtype())
                if dtype is not None:
                    numel = 1
                    for d in piece.get_shape():
                        numel *= d
                    counts[dtype] = counts.get(dtype, 0) + numel
    return max(counts, key=counts.get) if counts else torch.float32
