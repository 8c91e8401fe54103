"""Tiny checkpoints made on the spot, and a static HTTP server to serve them.

The local runner converts one as its demo, and the end-to-end tests serve several: no
model is downloaded from anywhere. Weights are random; the conversion does not care.
"""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

FAMILIES = ("gpt2", "llama")


def make_tiny_checkpoint(out_dir: Path, family: str = "gpt2", *, seed: int = 0,
                         init_range: float = 0.1, layers: int = 2) -> Path:
    """Save a ``layers``-layer model of ``family`` (gpt2, llama) with random weights as a
    Hugging Face directory (config.json + model.safetensors). ``init_range`` is larger than
    the usual 0.02 so that the activations reach their non-linear range."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=96, n_positions=64, n_embd=32, n_layer=layers, n_head=4, initializer_range=init_range,
            bos_token_id=0, eos_token_id=0,  # GPT-2's own 50256 lies outside this small vocabulary
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=init_range, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir)
    return out_dir


def make_unsupported_checkpoint(out_dir: Path) -> Path:
    """A directory that looks like a checkpoint but names an architecture nobody knows."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({
        "model_type": "foo", "architectures": ["FooForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
    }))
    save_file({"foo.weight": torch.zeros(8, 8)}, str(out_dir / "model.safetensors"))
    return out_dir


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextmanager
def serve_directory(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``root`` over HTTP on a free port; yields the base URL (ending in /)."""
    server = ThreadingHTTPServer((host, 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="checkpoint-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
