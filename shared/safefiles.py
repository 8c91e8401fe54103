"""Checks on files a user gave us: tar extraction, safetensors headers, config.json.

Everything here treats its input as hostile. Nothing is trusted from an archive or a
header until it has been checked against the limits, and archive members are written
by hand (never with `tarfile.extract`) so that only plain files and directories under
the destination can ever be created.
"""
from __future__ import annotations

import gzip
import json
import re
import struct
import tarfile
import zlib
from pathlib import Path, PurePosixPath

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"

# Suffixes of files that are (or usually are) Python pickles: loading one can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

MAX_CONFIG_BYTES = 8 * 2**20
MAX_INDEX_BYTES = 64 * 2**20
# The same bound the safetensors library itself uses for the JSON header.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000

# Bytes per element of every dtype we accept; anything else (sub-byte floats, complex,
# unknown strings) is refused rather than guessed at.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
MAX_TENSOR_RANK = 16

# tar metadata members (long names, pax headers) are read whole into memory by tarfile,
# so their size is capped before tarfile gets to read them.
MAX_TAR_METADATA_BYTES = 1 * 2**20
_TAR_METADATA_TYPES = {
    tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
}
# Room the tar format needs beyond file contents: a header block plus padding per member.
_TAR_OVERHEAD_PER_MEMBER = 3 * 512
_TAR_FIXED_OVERHEAD = 16 * 2**20
_COPY_CHUNK = 1 << 20

_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*\.safetensors$")


class FetchError(Exception):
    """A refused or failed download; `code` is stable and goes into the job's error."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)  # both in args, so the error survives pickling
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


def _fail(code: str, message: str) -> FetchError:
    return FetchError(code, message)


# --- config.json ----------------------------------------------------------------------

def validate_config(path: Path) -> dict:
    """config.json must be a small UTF-8 JSON object."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise _fail("config_invalid", f"config.json is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail("config_invalid", f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _fail("config_invalid", f"config.json must hold a JSON object, not {type(config).__name__}")
    return config


# --- safetensors ----------------------------------------------------------------------

def _invalid(path: Path, detail: str) -> FetchError:
    return _fail("safetensors_invalid", f"{path.name}: {detail}")


def _reject_duplicate_keys(pairs):
    # Two entries with one name would let a header show one tensor and load another.
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_count(value) -> bool:
    # bool is a subclass of int in Python; `true` is not a valid dimension or offset.
    return type(value) is int and value >= 0


def validate_safetensors_header(path, max_tensors: int) -> dict:
    """Check a .safetensors file's header against the file and return the parsed header.

    Checked: the 8-byte header length (bounded, fits the file), a JSON object with no
    duplicate names, optional string-to-string `__metadata__`, at most `max_tensors`
    tensors, each with an allowed dtype, a shape of non-negative ints and data_offsets
    whose span equals numel x itemsize, and the spans tiling the data section exactly
    (no overlaps, no holes, nothing past the end) as the format requires.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _invalid(path, f"file is {size} bytes, too short to hold the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise _invalid(path, f"declares a {header_len}-byte header; the limit is {MAX_SAFETENSORS_HEADER_BYTES}")
        if header_len > size - 8:
            raise _invalid(path, f"declares a {header_len}-byte header but only {size - 8} bytes follow (truncated?)")
        raw = f.read(header_len)
    header = _parse_header(path, raw)
    _check_metadata(path, header.get("__metadata__"))
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    if len(tensors) > max_tensors:
        raise _invalid(path, f"holds {len(tensors)} tensors; the limit is {max_tensors}")
    data_size = size - 8 - header_len
    spans = [(*_check_tensor(path, name, info, data_size), name) for name, info in tensors.items()]
    _check_layout(path, spans, data_size)
    return header


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _invalid(path, f"header must be a JSON object, not {type(header).__name__}")
    return header


def _check_metadata(path: Path, metadata) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "__metadata__ must be an object of strings")


def _check_tensor(path: Path, name: str, info, data_size: int) -> tuple[int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise _invalid(path, f"tensor {name!r} must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _invalid(path, f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK or not all(map(_is_count, shape)):
        raise _invalid(path, f"tensor {name!r} has shape {shape!r}; expected a list of non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _invalid(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    if begin > end or end > data_size:
        raise _invalid(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                             f"{data_size}-byte data section")
    numel = 1
    for dim in shape:
        numel *= dim
    needed = numel * DTYPE_SIZES[dtype]
    if end - begin != needed:
        raise _invalid(path, f"tensor {name!r}: {dtype} {shape} needs {needed} bytes but data_offsets "
                             f"span {end - begin}")
    return begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must tile the data section: overlaps alias data, holes hide extra bytes."""
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise _invalid(path, f"tensor {name!r} [{begin}, {end}] overlaps tensor {previous!r}")
        if begin > covered:
            raise _invalid(path, f"bytes [{covered}, {begin}) before tensor {name!r} belong to no tensor")
        covered, previous = end, name
    if covered != data_size:
        raise _invalid(path, f"data section is {data_size} bytes but tensors cover only {covered}")


def read_index_shards(path: Path, max_tensors: int) -> list[str]:
    """The shard file names a model.safetensors.index.json names, each a plain file name."""
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise _invalid(path, f"index is larger than {MAX_INDEX_BYTES} bytes")
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(path, f"index is not valid JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _invalid(path, "index must be an object with a non-empty weight_map object")
    if len(weight_map) > max_tensors:
        raise _invalid(path, f"index names {len(weight_map)} tensors; the limit is {max_tensors}")
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        # Shard names become local file names and URL path segments: nothing but a plain name.
        if not isinstance(shard, str) or not _SHARD_NAME.match(shard):
            raise _invalid(path, f"index names an unsafe shard file {shard!r} "
                                 "(expected a plain file name ending in .safetensors)")
    return shards


# --- archives -------------------------------------------------------------------------

class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses oversized metadata and sparse members before tarfile reads them.

    tarfile reads a pax header or GNU long name whole into memory, and a sparse member
    map block by block; in a compressed archive either is a cheap memory bomb.
    """

    def _proc_member(self, tar):
        if self.type in _TAR_METADATA_TYPES and self.size > MAX_TAR_METADATA_BYTES:
            raise _fail("archive_too_large", f"archive has a {self.size}-byte metadata header; "
                                             f"the limit is {MAX_TAR_METADATA_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _fail("archive_unsafe_member", f"{self.name!r} is a sparse file; not accepted")
        return super()._proc_member(tar)


class _CappedReader:
    """A file object that refuses to yield more than `cap` decompressed bytes in total.

    This bounds the work a gzip bomb can cause even in parts of the stream that are not
    file contents (headers, padding) and so are not counted per member.
    """

    def __init__(self, raw, cap: int):
        self._raw, self._cap, self.count = raw, cap, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._cap - self.count + 1
        data = self._raw.read(min(size, self._cap - self.count + 1))
        self.count += len(data)
        if self.count > self._cap:
            raise _fail("archive_too_large", f"archive decompresses to more than {self._cap} bytes")
        return data


def _decompressed(raw):
    # Sniff the gzip magic rather than trusting the file name.
    magic = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw


def _member_path(name: str) -> PurePosixPath:
    """The member's relative path, or refusal for absolute paths and `..` traversal."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise _fail("archive_unsafe_member", f"member {name!r} has an absolute or unsafe path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if any(p == ".." for p in parts):
        raise _fail("archive_unsafe_member", f"member {name!r} escapes the archive with '..'")
    if parts and re.match(r"^[A-Za-z]:", parts[0]):
        raise _fail("archive_unsafe_member", f"member {name!r} has a drive-letter path")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_member_type(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hardlink"
        raise _fail("archive_unsafe_member", f"member {member.name!r} is a {kind} to {member.linkname!r}; "
                                             "links are not accepted")
    if member.ischr() or member.isblk() or member.isfifo():
        raise _fail("archive_unsafe_member", f"member {member.name!r} is a device or FIFO; not accepted")
    if member.sparse is not None or not (member.isreg() or member.isdir()):
        raise _fail("archive_unsafe_member", f"member {member.name!r} has unsupported type {member.type!r}")


class _Extraction:
    """Writes the members of one archive under `root`, counting files and real bytes."""

    def __init__(self, root: Path, max_files: int, max_bytes: int, allow_pickle: bool):
        self.root, self.max_files, self.max_bytes = root, max_files, max_bytes
        self.allow_pickle = allow_pickle
        self.files = 0
        self.bytes = 0

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise _fail("archive_too_large", f"archive holds more than {self.max_files} members")
        relative = _member_path(member.name)
        _check_member_type(member)
        target = self.root / relative
        if relative == PurePosixPath(".") and member.isdir():
            return
        if member.isdir():
            self._mkdir(target, member.name)
            return
        if not self.allow_pickle and relative.suffix.lower() in PICKLE_SUFFIXES:
            raise _fail("pickle_not_allowed", f"archive member {member.name!r} is a pickle file; "
                                              "pickle checkpoints are disabled (allow_pickle is off)")
        if self.bytes + member.size > self.max_bytes:
            raise self._too_large(member.name)
        self._mkdir(target.parent, member.name)
        self._write(tar.extractfile(member), target, member.name)

    def _too_large(self, name: str) -> FetchError:
        return _fail("archive_too_large", f"unpacking {name!r} would exceed {self.max_bytes} bytes")

    def _mkdir(self, path: Path, name: str) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise _fail("archive_unsafe_member", f"member {name!r} conflicts with another member") from None

    def _write(self, source, target: Path, name: str) -> None:
        try:
            out = open(target, "xb")  # exclusive: a repeated name must not replace a checked file
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise _fail("archive_unsafe_member", f"member {name!r} appears twice or conflicts") from None
        with out:
            # Count the bytes actually produced, not the size the header declared.
            for chunk in iter(lambda: source.read(_COPY_CHUNK), b""):
                self.bytes += len(chunk)
                if self.bytes > self.max_bytes:
                    raise self._too_large(name)
                out.write(chunk)


def extract_archive(archive: Path, dest: Path, limits) -> Path:
    """Safely unpack a .tar / .tar.gz into the empty directory `dest`; return the model dir.

    `limits` provides max_archive_files, max_unpacked_bytes and allow_pickle. If the
    archive holds a single top-level directory, that directory is the model directory.
    """
    extraction = _Extraction(dest, limits.max_archive_files, limits.max_unpacked_bytes, limits.allow_pickle)
    stream_cap = (limits.max_unpacked_bytes + _TAR_FIXED_OVERHEAD
                  + (limits.max_archive_files + 1) * _TAR_OVERHEAD_PER_MEMBER)
    try:
        with open(archive, "rb") as raw:
            reader = _CappedReader(_decompressed(raw), stream_cap)
            # Stream mode ("r|"): one forward pass, no seeking, members handled as they come.
            with tarfile.open(fileobj=reader, mode="r|", tarinfo=_GuardedTarInfo) as tar:
                for member in tar:
                    extraction.add(tar, member)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeError) as exc:
        raise _fail("archive_invalid", f"archive is corrupt or not a tar archive: {exc}") from None
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


# --- the downloaded model directory ---------------------------------------------------

def validate_model_dir(model_dir: Path, limits) -> None:
    """The directory must hold a valid config.json and weights we are willing to read."""
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise _fail("source_missing_file", "the source has no config.json")
    validate_config(config)
    if not limits.allow_pickle:
        pickles = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
                         if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _fail("pickle_not_allowed", f"the source holds pickle files {pickles[:5]}; "
                                              "pickle checkpoints are disabled (allow_pickle is off)")
    _check_weights_present(model_dir, limits)
    for path in sorted(model_dir.rglob("*.safetensors")):
        validate_safetensors_header(path, limits.max_tensors)


def _check_weights_present(model_dir: Path, limits) -> None:
    if (model_dir / SAFETENSORS_FILE).is_file():
        return
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        for shard in read_index_shards(index, limits.max_tensors):
            if not (model_dir / shard).is_file():
                raise _fail("source_missing_file", f"shard {shard} named by {SAFETENSORS_INDEX} is missing")
        return
    if limits.allow_pickle and (model_dir / PICKLE_FILE).is_file():
        return
    raise _fail("source_missing_file", f"the source has none of {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}"
                                       + (f", {PICKLE_FILE}" if limits.allow_pickle else ""))
