"""Fail fast, before the download: the worker's config check runs as soon as config.json is in,
so an unsupported model or one too large for the worker is refused having downloaded under
1 MiB of a source whose weights are far larger (bytes counted at the server)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.conversion.errors import ConversionError
from shared.conversion.options import ConversionOptions
from shared.conversion.preflight import preflight
from shared.fetch import FetchLimits, fetch_source

WEIGHTS_BYTES = 64 * 2**20
LIMITS = FetchLimits(allow_hosts=("127.0.0.1",), max_download_bytes=2**30)


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = self.server.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 1 << 16):
                self.wfile.write(body[start:start + (1 << 16)])
                self.server.sent += min(1 << 16, len(body) - start)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    httpd.files, httpd.sent = {}, 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def llama_config(**overrides):
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                  max_position_embeddings=128, hidden_act="silu")
    return json.dumps({**config, **overrides}).encode()


def refuse_early(directory: Path, **budgets):
    preflight(directory, ConversionOptions(), **budgets)


@pytest.mark.parametrize("config, budgets, code", [
    (llama_config(hidden_act="mish"), {}, "unsupported_architecture"),  # an activation with no heads
    (llama_config(architectures=["FooForCausalLM"], model_type="foo"), {}, "unsupported_architecture"),
    (llama_config(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256), {"memory_budget": 2 * 2**30}, "too_large_for_worker"),
])
def test_refused_before_the_weights(server, tmp_path, config, budgets, code):
    server.files = {"config.json": config, "model.safetensors": b"\0" * WEIGHTS_BYTES}
    url = f"http://127.0.0.1:{server.server_address[1]}/m/"
    with pytest.raises(ConversionError) as caught:
        fetch_source(url, tmp_path / "src", LIMITS, on_config=lambda d: refuse_early(d, **budgets))
    assert caught.value.code == code, caught.value
    assert server.sent < 2**20, f"{server.sent} bytes sent before the refusal"
    assert not any((tmp_path / "src").iterdir())
    if code == "too_large_for_worker":
        assert "GiB of memory" in caught.value.message and "budget is 2.0 GiB" in caught.value.message


def test_a_supported_model_is_fetched_whole(server, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.loads(llama_config())))
    model.save_pretrained(tmp_path / "saved")
    server.files = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    url = f"http://127.0.0.1:{server.server_address[1]}/m/"
    seen = []
    fetch_source(url, tmp_path / "src", LIMITS, on_config=lambda d: seen.append(preflight(d, ConversionOptions())))
    assert (tmp_path / "src" / "model.safetensors").is_file()
    assert seen and seen[0].ffn_sites == 2 and seen[0].peak_memory_bytes > 0
