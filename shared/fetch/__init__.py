"""Downloading a user-supplied source model without being turned against our own network.

`fetch_source(url, dest_dir, limits)` accepts http(s) URLs of a Hugging Face style
directory or of a .tar/.tar.gz/.tgz archive, and s3:// URLs of either. The defences:

* URLs are parsed once (`urls`), the way browsers parse hosts (decimal, hex, octal and short
  IPv4 forms, IDNA, trailing dots), and every request is built from that parse, so no
  second parser can disagree about the host.
* A host is resolved once per fetch; every address is checked against the blocked ranges
  (loopback, private, link-local/metadata, CGNAT, multicast, ... and IPv6 forms that embed
  an IPv4 address; `addresses`) and the connection goes to a checked address only (`http_remote`). A DNS answer that
  changes later (rebinding) is never consulted.
* Redirects are followed by hand, each target checked like the first URL.
* Timeouts on connect and read; a byte budget and a deadline enforced while streaming (`meter`).
* Archives are unpacked and headers validated by `shared.safefiles`.
* s3:// sources are read only inside the owner's scopes (`shared.source_scopes`, carried
  by `FetchLimits.s3_source_rules`; none allows no s3:// source), never from the
  artifacts bucket; checked before any S3 client exists (`s3_remote`).
* A job's own S3 endpoint (`FetchLimits.s3_endpoint_checked`) is resolved and every address
  checked before its S3 client exists (`shared.s3_endpoint`); boto3 then resolves the name
  again itself, so unlike http(s) sources its connection is not pinned to the checked address.
* On any failure `dest_dir` is left empty.
* `post_checked` sends webhook events (shared/webhook_delivery.py) through the same
  address checks and pinned connections; it follows no redirect.

This module walks a source (a directory's files in order, or an archive) and publishes it;
`limits` holds what one fetch may take. Error codes (FetchError.code) are part of the job API;
never rename one.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from shared.hub import HubSource
from shared.safefiles import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    FetchError,
    extract_archive,
    read_index_shards,
    validate_config,
    validate_model_dir,
    validate_safetensors_header,
)

from .addresses import AddressPolicy, resolve
from .http_remote import HttpRemote, post_checked
from .limits import FetchLimits, Progress, WeightHashes
from .meter import Meter, NotFound
from .s3_remote import S3Remote
from .urls import ParsedUrl, parse_url

__all__ = [
    "ERROR_CODES", "AddressPolicy", "FetchError", "FetchLimits", "ParsedUrl", "fetch_source", "parse_url",
    "post_checked", "resolve", "validate_config", "validate_safetensors_header",
]

ERROR_CODES = (
    "url_invalid", "url_scheme_not_allowed", "url_address_blocked", "too_many_redirects",
    "download_timeout", "source_not_found", "source_http_error", "source_unreachable",
    "download_too_large", "source_missing_file", "pickle_not_allowed",
    "archive_unsafe_member", "archive_too_large", "archive_invalid",
    "safetensors_invalid", "config_invalid", "source_forbidden", "source_unauthorized",
)


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# Files a directory may carry beside its weights (the tokenizer the conversion calibrates
# with); each is optional, and each is capped.
OPTIONAL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                  "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")
MAX_OPTIONAL_FILE_BYTES = 64 * 2**20


def _download_hf_directory(remote, model_dir: Path, meter: Meter, limits: FetchLimits,
                           on_config: Callable[[Path], None] | None = None,
                           on_weights: WeightHashes | None = None) -> None:
    """config.json (then `on_config(model_dir)`, which may refuse the model before any weights
    come), the tokenizer's files where present, then (`on_weights`, where the hub declares
    the weights' hashes) model.safetensors, or the index and its shards, or (if allowed) a
    pickle."""
    config_cap = (MAX_CONFIG_BYTES, FetchError("config_invalid", f"config.json is larger than {MAX_CONFIG_BYTES} bytes"))
    remote.download(CONFIG_FILE, model_dir / CONFIG_FILE, meter, config_cap)
    validate_config(model_dir / CONFIG_FILE)
    if on_config is not None:
        on_config(model_dir)
    for name in OPTIONAL_FILES:
        cap = (MAX_OPTIONAL_FILE_BYTES, FetchError("download_too_large", f"{name} is larger than {MAX_OPTIONAL_FILE_BYTES} bytes"))
        try:
            remote.download(name, model_dir / name, meter, cap)
        except NotFound:
            pass
    index_cap = (MAX_INDEX_BYTES, FetchError("safetensors_invalid", f"{SAFETENSORS_INDEX} is larger than {MAX_INDEX_BYTES} bytes"))
    if on_weights is not None and getattr(remote, "hub", False):
        hashes = _hub_weight_hashes(remote, model_dir, meter, limits, index_cap)
        if hashes is not None:
            on_weights(model_dir, hashes)
    try:
        remote.download(SAFETENSORS_FILE, model_dir / SAFETENSORS_FILE, meter)
        return
    except NotFound:
        pass
    try:
        if not (model_dir / SAFETENSORS_INDEX).is_file():  # _hub_weight_hashes may have it already
            remote.download(SAFETENSORS_INDEX, model_dir / SAFETENSORS_INDEX, meter, index_cap)
    except NotFound:
        _download_pickle(remote, model_dir, meter, limits)
        return
    for shard in read_index_shards(model_dir / SAFETENSORS_INDEX, limits.max_tensors):
        try:
            remote.download(shard, model_dir / shard, meter)
        except NotFound:
            raise FetchError("source_missing_file", f"shard {shard} named by {SAFETENSORS_INDEX} "
                                                    "does not exist") from None


def _hub_weight_hashes(remote: HttpRemote, model_dir: Path, meter: Meter, limits: FetchLimits,
                       index_cap) -> dict[str, str] | None:
    """The hub's SHA-256 of each weight file the fetch will download (model.safetensors, else
    the index's shards, the index itself downloaded here), without downloading them; None
    when the hub does not declare them all (or the source has no safetensors weights)."""
    try:
        digest = remote.linked_sha256(SAFETENSORS_FILE)
        return None if digest is None else {SAFETENSORS_FILE: digest}
    except NotFound:
        pass
    try:
        remote.download(SAFETENSORS_INDEX, model_dir / SAFETENSORS_INDEX, meter, index_cap)
    except NotFound:
        return None
    hashes: dict[str, str] = {}
    for shard in read_index_shards(model_dir / SAFETENSORS_INDEX, limits.max_tensors):
        try:
            digest = remote.linked_sha256(shard)
        except NotFound:
            return None  # the download that follows reports the missing shard
        if digest is None:
            return None
        hashes[shard] = digest
    return hashes


def _download_pickle(remote, model_dir: Path, meter: Meter, limits: FetchLimits) -> None:
    if not limits.allow_pickle:
        # Only the status is asked for: a refused pickle is never downloaded, let alone loaded.
        if remote.exists(PICKLE_FILE):
            raise FetchError("pickle_not_allowed",
                             f"the source has only {PICKLE_FILE}, a pickle; pickle checkpoints are "
                             "disabled (allow_pickle is off). Convert it to safetensors.")
        raise FetchError("source_missing_file",
                         f"the source has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
    try:
        remote.download(PICKLE_FILE, model_dir / PICKLE_FILE, meter)
    except NotFound:
        raise FetchError("source_missing_file", f"the source has none of {SAFETENSORS_FILE}, "
                                                f"{SAFETENSORS_INDEX}, {PICKLE_FILE}") from None


def _is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _remote(url: ParsedUrl, limits: FetchLimits):
    if url.scheme == "s3":
        return S3Remote(url, limits)
    if url.scheme == "hf":
        base = parse_url(HubSource(url.host, url.target).base_url(limits.hub_endpoint))
        return HttpRemote(base, limits, token=limits.hub_token, hub=True)
    return HttpRemote(url, limits)


def _download(url: ParsedUrl, staging: Path, limits: FetchLimits, meter: Meter, on_config=None,
              on_weights=None) -> Path:
    remote = _remote(url, limits)
    try:
        if _is_archive(url.path):
            archive = staging / "archive"
            remote.download(None, archive, meter)
            tree = staging / "tree"
            tree.mkdir()
            model_dir = extract_archive(archive, tree, limits)
            if on_config is not None and (model_dir / CONFIG_FILE).is_file():
                validate_config(model_dir / CONFIG_FILE)
                on_config(model_dir)
            return model_dir
        model_dir = staging / "model"
        model_dir.mkdir()
        _download_hf_directory(remote, model_dir, meter, limits, on_config, on_weights)
        return model_dir
    finally:
        remote.close()


# --- the destination directory --------------------------------------------------------

def _empty_dir(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _publish(model_dir: Path, dest_dir: Path) -> None:
    for entry in list(model_dir.iterdir()):
        entry.replace(dest_dir / entry.name)


def fetch_source(url: str, dest_dir: Path, limits: FetchLimits, progress: Progress | None = None,
                 on_config: Callable[[Path], None] | None = None,
                 on_weights: WeightHashes | None = None) -> Path:
    """Download the model at `url` into `dest_dir` and return `dest_dir`.

    `on_config(directory)` runs as soon as config.json is in (for a directory URL: before any
    weights are requested), and may raise to refuse the model without downloading it.
    `on_weights(directory, {weight file: sha256})` runs, for hf:// sources whose hub declares
    the weights' hashes, once every other file is in and before any weights are requested; it
    may raise to stop the fetch (the worker does when an earlier job converted the same).

    `dest_dir` belongs to the fetch: anything already in it is removed first (a job
    delivered again after a crash starts clean), and it is left empty on any failure.
    `progress(bytes_done, bytes_total)` is called while downloading; bytes_total is None
    when unknown. Raises FetchError with a stable `code`; other exceptions (for example
    one raised by `progress` to cancel) propagate unchanged after the same cleanup.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    _empty_dir(dest_dir)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest_dir))
    try:
        parsed = parse_url(url)
        meter = Meter(limits.max_download_bytes, progress, limits.deadline_seconds)
        model_dir = _download(parsed, staging, limits, meter, on_config, on_weights)
        validate_model_dir(model_dir, limits)
        _publish(model_dir, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _empty_dir(dest_dir)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return dest_dir
