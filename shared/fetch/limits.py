"""What one fetch may take: sizes, timeouts, redirects, hosts, S3 and hub settings, a deadline."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shared.source_scopes import SourceRules

Progress = Callable[[int, "int | None"], None]
WeightHashes = Callable[[Path, "dict[str, str]"], None]


@dataclass(frozen=True)
class FetchLimits:
    max_download_bytes: int = 20 * 2**30      # total over all files, enforced while streaming
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_redirects: int = 3
    allow_hosts: tuple[str, ...] = ()         # names or IPs/CIDRs that may be loopback/private
    max_archive_files: int = 10_000
    max_unpacked_bytes: int = 40 * 2**30
    allow_pickle: bool = False
    s3_endpoint_url: str | None = field(default=None, repr=False)
    # The endpoint is the job's own (SourceCredentials.s3_endpoint_url): its addresses are
    # checked before the client exists, and errors do not name it.
    s3_endpoint_checked: bool = False
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    max_tensors: int = 100_000
    # Which s3:// sources this fetch may read (the job owner's scopes); None: none at all.
    s3_source_rules: SourceRules | None = None
    # hf:// sources: the hub's endpoint, and the job's token for it (sent to that host only)
    hub_endpoint: str = "https://huggingface.co"
    hub_token: str | None = field(default=None, repr=False)
    # The whole fetch must end within this many seconds, whatever the read timeouts allow (a
    # server that drips one byte per read timeout is stopped here). None: no deadline.
    deadline_seconds: float | None = None

