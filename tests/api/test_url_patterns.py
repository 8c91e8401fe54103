"""source_url's documented pattern (api/url_patterns.py) against what the submission accepts:
every string the pattern allows passes JobCreate, the fetcher's parser included."""
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import ValidationError

from api.schemas import JobCreate
from api.url_patterns import SOURCE_URL_PATTERN


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.from_regex(SOURCE_URL_PATTERN, fullmatch=True).filter(lambda url: len(url) <= 2048))
def test_every_url_of_the_pattern_is_accepted(url):
    assert JobCreate(source_url=url).source_url == url


def test_the_schema_publishes_the_pattern():
    schema = JobCreate.model_json_schema()
    assert schema["properties"]["source_url"]["pattern"] == SOURCE_URL_PATTERN


@pytest.mark.parametrize("url", [
    "https://example.org/models/gpt2-tiny/", "HTTP://host:8080/m.tar.gz?x=1", "s3://my-bucket/models/gpt2",
    "s3://team.models/x", "hf://openai-community/gpt2", "hf://Org/Repo.v2@refs/pr/1",
])
def test_ordinary_sources_match(url):
    assert re.fullmatch(SOURCE_URL_PATTERN, url)


@pytest.mark.parametrize("url", [
    "1", "example.org/m", "ftp://example.org/m", "https://user@example.org/m", "https://exa mple.org/",
    "s3://1.2.3.4/key", "s3://Bucket/key", "s3://bucket/key?versionId=1", "hf://org/../x", "hf://org/repo/extra",
    "https://example.org/\n",
])
def test_what_the_pattern_leaves_out_is_refused(url):
    with pytest.raises(ValidationError):
        JobCreate(source_url=url)
