"""webhook_url's documented pattern (api/url_patterns.py) against the submission's checks:
every URL the pattern allows passes JobCreate and is either accepted by the webhook check
(shared.webhook_delivery.check_target) or refused for its address, never as malformed; and
every address Python writes (IPv4 dotted, IPv6 compressed or exploded) fits the pattern."""
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from api.schemas import JobCreate
from api.url_patterns import WEBHOOK_URL_PATTERN
from shared.webhook_delivery import WebhookTargetError, check_target

SOURCE = "https://example.org/gpt2/"
FUZZ = settings(max_examples=600, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.from_regex(WEBHOOK_URL_PATTERN, fullmatch=True).filter(lambda url: len(url) <= 2048))
def test_every_url_of_the_pattern_is_accepted_or_blocked_for_its_address(url):
    assert JobCreate(source_url=SOURCE, webhook_url=url).webhook_url == url
    try:
        check_target(url, allow_hosts=())
    except WebhookTargetError as exc:
        assert exc.code == "webhook_address_blocked", (url, exc.message)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.ip_addresses(), st.booleans())
def test_every_address_fits_the_pattern(ip, exploded):
    host = (ip.exploded if exploded else str(ip)) if ip.version == 4 else f"[{ip.exploded if exploded else ip}]"
    assert re.fullmatch(WEBHOOK_URL_PATTERN, f"https://{host}:8443/hook")


def test_the_schema_publishes_the_pattern():
    assert JobCreate.model_json_schema()["properties"]["webhook_url"]["anyOf"][0]["pattern"] == WEBHOOK_URL_PATTERN


@pytest.mark.parametrize("url", [
    "https://hooks.example.org/attnonly?team=a", "HTTP://receiver:8080/x#frag", "http://localhost./",
    "https://abcdef0123456789abcdef0123456789.lambda-url.eu-west-1.on.aws/", "http://93.184.216.34/hook",
    "http://[2606:4700:4700::1111]:443/", "http://[::ffff:192.0.2.1]/", "https://a_b-c.d.e.f.g.example.com",
])
def test_ordinary_receivers_match(url):
    assert re.fullmatch(WEBHOOK_URL_PATTERN, url)


@pytest.mark.parametrize("url", [
    "0", "hooks.example.org/x", "ftp://hooks.example.org/", "http://0x7f.1/", "http://127.1/", "http://2130706433/",
    "http://1.2.3.256/", "http://example.123/", "http://[::1%25eth0]/", "http://[1:2:3:4:5:6:7:8:9]/",
    "http://user@hooks.example.org/", "http://hooks.example.org:65536/", "http://hooks.example.org:/",
    "http://" + "a" * 64 + ".example.org/", "http://" + ".".join(["a"] * 9) + "/", "http://host/\u00e9",
])
def test_what_the_pattern_leaves_out(url):
    assert not re.fullmatch(WEBHOOK_URL_PATTERN, url)
