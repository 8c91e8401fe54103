"""The documented shape of a job's ``source_url``: one regular expression, published as the
field's OpenAPI ``pattern`` and enforced by the request model, so that every string the
schema allows is a URL the submission accepts (JobCreate's validator runs the fetcher's own
parser on s3:// and hf:// URLs after the pattern; the pattern is a subset of what that
parser takes).

Kept to one dialect that JSON Schema (ECMA-262), pydantic (Rust regex) and Python's ``re``
read alike: no look-arounds, no inline flags (scheme letters are spelled out in either case).
"""
from __future__ import annotations

# Printable ASCII without space; in s3 keys also without ? and # (they have no query).
_PRINTABLE = r"\x21-\x5b\x5d-\x7e"  # no backslash: parsers disagree on it
_S3_KEY = r"[\x21\x22\x24-\x3e\x40-\x5b\x5d-\x7e]"

# http(s)://HOST[:PORT][/path][?query][#fragment]. The host part takes RFC 3986 reg-name
# characters only: no user@ (refused by the fetcher) and no [IPv6] literal (Python's URL
# splitter raises on malformed brackets; name an IPv6 host by its DNS name instead).
HTTP = r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'()*+,;=:-]+(?:[/?#][" + _PRINTABLE + r"]*)?"

# s3://BUCKET[/key]: a bucket name of 3 to 61 characters whose last dot-separated label
# starts with a letter, which keeps it from reading as an IPv4 address (refused for buckets).
S3 = r"[Ss]3://(?:[a-z0-9][a-z0-9-]{0,28}\.)?[a-z][a-z0-9-]{1,28}[a-z0-9](?:/" + _S3_KEY + r"*)?"

# hf://ORG/REPO[@REVISION]: names as the hub allows them (letters and digits, single . _ -
# between them, at most 95 characters; no ".." and no "--"), a revision of branch, tag or
# commit characters with single separators.
_HUB_NAME = r"[A-Za-z0-9](?:[._-]?[A-Za-z0-9]){0,47}"
HF = r"[Hh][Ff]://" + _HUB_NAME + "/" + _HUB_NAME + r"(?:@[A-Za-z0-9](?:[._/-]?[A-Za-z0-9]){0,63})?"

SOURCE_URL_PATTERN = f"^(?:{HTTP}|{S3}|{HF})$"


# --- webhook_url -------------------------------------------------------------------------
# http(s)://HOST[:PORT][/path][?query][#fragment], HOST exactly as the webhook check
# (shared.webhook_delivery.check_target, through the fetcher's parse_url) reads it, so that a
# URL the pattern allows is either accepted or refused for its address (403
# webhook_address_blocked), never malformed:
# - a host name: letters, digits, _ and -, in up to 8 labels (the first up to 63 characters,
#   the others, the last or only one included, up to 26: at most 252 in all, inside DNS's
#   253), the last starting with a letter (a last label of digits or 0x... is read as an
#   IPv4 address);
# - an IPv4 address in dotted-decimal form (the fetcher also reads 127.1, 0x7f.0.0.1 or
#   2130706433 as addresses; such obfuscated spellings are refused as invalid instead);
# - an [IPv6] literal (RFC 3986's IPv6address, no zone).
_NAME = r"(?:[A-Za-z0-9_-]{1,63}\.)?(?:[A-Za-z0-9_-]{1,26}\.){0,6}[A-Za-z][A-Za-z0-9_-]{0,25}\.?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"


def _ipv6() -> str:
    """RFC 3986 section 3.2.2's IPv6address, spelled out alternative by alternative."""
    h16 = "[0-9A-Fa-f]{1,4}"
    ls32 = f"(?:{h16}:{h16}|{_IPV4})"

    def groups(n: int) -> str:  # n times "h16:"
        return f"(?:{h16}:){{{n}}}" if n else ""

    def head(n: int) -> str:  # [ *n( h16 ":" ) h16 ]
        return f"(?:(?:{h16}:){{0,{n}}}{h16})?"

    alternatives = [groups(6) + ls32, "::" + groups(5) + ls32]
    alternatives += [head(n) + "::" + groups(4 - n) + ls32 for n in range(0, 4)]
    alternatives += [head(4) + "::" + ls32, head(5) + "::" + h16, head(6) + "::"]
    return "(?:" + "|".join(alternatives) + ")"


_PORT = r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
WEBHOOK_URL_PATTERN = (rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:{_NAME}|{_IPV4}|\[{_ipv6()}\]){_PORT}"
                       rf"(?:[/?#][{_PRINTABLE}]*)?$")


# --- source_credentials.s3_endpoint_url --------------------------------------------------
# http(s)://HOST[:PORT][/path]: the webhook_url host and port (read alike by
# shared.s3_endpoint.check_endpoint, through the same parser), and no query or fragment (an
# S3 endpoint has none).
S3_ENDPOINT_PATTERN = (rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:{_NAME}|{_IPV4}|\[{_ipv6()}\]){_PORT}"
                       rf"(?:/{_S3_KEY}*)?$")
