"""hf:// sources against a local imitation of a model hub: its resolve URLs, a redirect of the
weights to a storage host, and 401 for a gated repository without the right token. The token
reaches the hub's host only, never the storage host it redirects to."""
import hashlib

import pytest

from hub_imitation import TOKEN, serve_hub  # tests/ is on sys.path (pytest's rootdir-based import)
from shared.fetch import FetchError, FetchLimits, fetch_source, parse_url
from shared.hub import parse_hub_url


def _tiny_model(path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("hubmodel"))


@pytest.fixture(scope="module")
def hub(saved):
    with serve_hub(saved) as httpd:
        yield httpd


def limits(hub, token=None):
    return FetchLimits(allow_hosts=("127.0.0.1", "localhost"), hub_endpoint=hub.endpoint, hub_token=token)


@pytest.mark.parametrize("url, repo, revision", [
    ("hf://org/model", "org/model", "main"), ("hf://org/model@0123abcd", "org/model", "0123abcd"),
    ("hf://Org-1/m.v2@refs/pr/1", "Org-1/m.v2", "refs/pr/1")])
def test_parse(url, repo, revision):
    source = parse_hub_url(url)
    assert (source.repo_id, source.revision) == (repo, revision)
    assert parse_url(url).scheme == "hf"


@pytest.mark.parametrize("url", ["hf://org", "hf://org/../x", "hf://org/m/extra", "hf://org/m@../x", "hf://o rg/m",
                                 "hf://org/m@"])
def test_bad_hub_urls(url):
    with pytest.raises(FetchError) as caught:
        parse_url(url)
    assert caught.value.code == "url_invalid"


def test_public_repository_through_a_storage_redirect(hub, tmp_path):
    hub.seen.clear()
    fetch_source("hf://org/public", tmp_path / "a", limits(hub, TOKEN))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    to_storage = [s for s in hub.seen if s[1].startswith("/blobs/")]
    assert to_storage and all(auth is None for _, _, auth in to_storage)  # never after the redirect
    assert any(auth == f"Bearer {TOKEN}" for host, path, auth in hub.seen if path.startswith("/org/public/"))


def test_gated_repository_needs_the_token(hub, tmp_path):
    with pytest.raises(FetchError) as caught:
        fetch_source("hf://org/gated@0123abcd", tmp_path / "b", limits(hub))
    assert caught.value.code == "source_unauthorized"
    with pytest.raises(FetchError) as caught:
        fetch_source("hf://org/gated", tmp_path / "c", limits(hub, "hf_wrong"))
    assert caught.value.code == "source_unauthorized" and "hf_wrong" not in caught.value.message
    fetch_source("hf://org/gated@0123abcd", tmp_path / "d", limits(hub, TOKEN))
    assert (tmp_path / "d" / "config.json").is_file()


def test_token_is_not_in_the_limits_repr(hub):
    assert TOKEN not in repr(limits(hub, TOKEN))


class _Stop(Exception):
    pass


def test_weight_hashes_come_from_the_hub_before_any_weights(hub, saved, tmp_path):
    hub.seen.clear()
    seen = {}

    def on_weights(directory, hashes):
        seen.update(hashes=hashes, files=sorted(p.name for p in directory.iterdir()),
                    requests=[path for _, path, _ in hub.seen])
        raise _Stop()  # as the worker does when it reuses an earlier conversion

    with pytest.raises(_Stop):
        fetch_source("hf://org/public", tmp_path / "a", limits(hub), on_weights=on_weights)
    expected = hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    assert seen["hashes"] == {"model.safetensors": expected}
    assert "config.json" in seen["files"] and "model.safetensors" not in seen["files"]
    assert not any(path.endswith(".safetensors") for path in seen["requests"])  # no weights asked for
    assert not any(path.endswith(".safetensors") for _, path, _ in hub.seen)  # nor after the stop
    assert list((tmp_path / "a").iterdir()) == []


def test_sharded_weights_each_shard_hashed_and_the_download_goes_on(tmp_path_factory, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("sharded")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        model_dir, max_shard_size="20KB")
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert len(shards) > 1
    got = {}
    with serve_hub(model_dir) as shard_hub:
        fetch_source("hf://org/sharded", tmp_path / "s", limits(shard_hub), on_weights=lambda d, h: got.update(h))
        index_gets = [path for _, path, _ in shard_hub.seen if path.endswith(".index.json")]
    assert got == {n: hashlib.sha256((model_dir / n).read_bytes()).hexdigest() for n in shards}
    assert sorted(p.name for p in (tmp_path / "s").glob("*.safetensors")) == shards
    assert len(index_gets) == 1  # fetched once, for the hashes, and kept


def test_a_hub_without_linked_etags_gives_no_hashes(saved, tmp_path):
    called = []
    with serve_hub(saved, linked_etags=False) as plain:
        fetch_source("hf://org/public", tmp_path / "p", limits(plain), on_weights=lambda d, h: called.append(h))
        assert plain.heads  # it was asked
    assert called == []
    assert (tmp_path / "p" / "model.safetensors").is_file()


def test_the_head_of_a_gated_file_carries_the_token(hub, tmp_path):
    got = {}
    # The imitation answers 401 to a HEAD without the token: a hash arriving shows it was sent.
    fetch_source("hf://org/gated", tmp_path / "g", limits(hub, TOKEN), on_weights=lambda d, h: got.update(h))
    assert list(got) == ["model.safetensors"]
