"""hf://ORG/REPO[@REVISION] sources: a model hub repository at a revision (a branch, tag or
commit hash; `main` by default), fetched file by file from the hub's resolve URLs through the
same guarded HTTP client as any source. A job's bearer token goes to the hub's own host only,
never after a redirect to another host (the hub redirects large files to its storage)."""
import re
from dataclasses import dataclass
from urllib.parse import quote

from shared.safefiles import FetchError

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
SCHEME = "hf"


@dataclass(frozen=True)
class HubSource:
    repo_id: str  # ORG/REPO
    revision: str

    def base_url(self, endpoint: str) -> str:
        """The directory URL whose files are the repository's files at the revision."""
        return f"{endpoint.rstrip('/')}/{self.repo_id}/resolve/{quote(self.revision, safe='')}/"


def parse_hub_url(url: str) -> HubSource:
    if not url.lower().startswith(f"{SCHEME}://"):
        raise FetchError("url_invalid", f"not an {SCHEME}:// URL: {url!r}")
    rest = url[len(SCHEME) + 3:]
    repo, at, revision = rest.partition("@")
    if at and not revision:
        raise FetchError("url_invalid", f"{url!r}: an empty revision after '@'")
    parts = repo.strip("/").split("/")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts) or any(".." in p for p in parts):
        raise FetchError("url_invalid", f"{url!r}: expected hf://ORG/REPO[@REVISION] with plain names")
    revision = revision or "main"
    if not _REVISION.match(revision) or ".." in revision or "//" in revision:
        raise FetchError("url_invalid", f"{url!r}: {revision!r} is not a valid revision")
    return HubSource("/".join(parts), revision)
