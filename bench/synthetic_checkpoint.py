"""LLaMA- and Mixtral-shaped checkpoints written straight to disk, tensor by tensor (the model is
never built in memory): config.json (transformers' config class) and safetensors shards from a
streaming writer (8-byte little-endian header length, JSON header, then the raw bytes of one
tensor after another); random normal values generated in chunks in the storage dtype. Used by
bench/memory.py; the header reader checks what a conversion kept."""
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import MiB, fmt_bytes

DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str
    max_positions: int = 2048
    rope_theta: float = 10000.0
    bos: int = 1
    eos: int = 2
    experts: int = 0  # Mixtral-shaped when > 0: E experts of intermediate size F each, top_k per token
    top_k: int = 2

    @property
    def head_dim(self):
        return self.hidden // self.heads

    def tensors(self):
        """(name, shape, kind) in LlamaForCausalLM state-dict order; kind 'w' (std 0.02) or 'norm'."""
        D, F, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, D), "w"
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.self_attn.q_proj.weight", (self.heads * self.head_dim, D), "w"
            yield f"{p}.self_attn.k_proj.weight", (kv, D), "w"
            yield f"{p}.self_attn.v_proj.weight", (kv, D), "w"
            yield f"{p}.self_attn.o_proj.weight", (D, self.heads * self.head_dim), "w"
            if self.experts:
                yield f"{p}.mlp.gate.weight", (self.experts, D), "w"
                yield f"{p}.mlp.experts.gate_up_proj", (self.experts, 2 * F, D), "w"
                yield f"{p}.mlp.experts.down_proj", (self.experts, D, F), "w"
            else:
                yield f"{p}.mlp.gate_proj.weight", (F, D), "w"
                yield f"{p}.mlp.up_proj.weight", (F, D), "w"
                yield f"{p}.mlp.down_proj.weight", (D, F), "w"
            yield f"{p}.input_layernorm.weight", (D,), "norm"
            yield f"{p}.post_attention_layernorm.weight", (D,), "norm"
        yield "model.norm.weight", (D,), "norm"
        yield "lm_head.weight", (self.vocab, D), "w"

    def params(self):
        return sum(numel(s) for _, s, _ in self.tensors())

    def weight_bytes(self):
        return self.params() * DTYPES[self.dtype][1]

    def config(self) -> dict:
        moe = dict(num_local_experts=self.experts, num_experts_per_tok=self.top_k) if self.experts else {}
        return dict(**moe, architectures=["MixtralForCausalLM" if self.experts else "LlamaForCausalLM"], hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    head_dim=self.head_dim, vocab_size=self.vocab, max_position_embeddings=self.max_positions,
                    rms_norm_eps=1e-5, rope_theta=self.rope_theta, hidden_act="silu", tie_word_embeddings=False,
                    bos_token_id=self.bos, eos_token_id=self.eos, dtype=self.dtype)

    def config_class(self):
        from transformers import LlamaConfig, MixtralConfig

        return MixtralConfig if self.experts else LlamaConfig

    def describe(self):
        kind = f"Mixtral-shaped, {self.experts} experts (top {self.top_k}) of" if self.experts else "LLaMA-shaped"
        return (f"{kind} D={self.hidden}, F={self.intermediate}, {self.heads} heads / {self.kv_heads} KV heads, "
                f"vocab {self.vocab}, {self.layers} layers, {self.dtype}: {self.params() / 1e6:.0f}M parameters, "
                f"{fmt_bytes(self.weight_bytes())} of weights")


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(shape: Shape, directory: Path, max_shard_bytes: int, seed: int = 0, log=None) -> dict:
    """config.json + model.safetensors (or shards + index), streamed one tensor at a time."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    shape.config_class()(**shape.config()).save_pretrained(directory)
    dtype, (st_dtype, size) = getattr(torch, shape.dtype), DTYPES[shape.dtype]
    entries = list(shape.tensors())
    shards, current, used = [], [], 0
    for entry in entries:
        n = numel(entry[1]) * size
        if current and used + n > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(entry)
        used += n
    shards.append(current)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    generator = torch.Generator().manual_seed(seed)
    chunk_elems = 16 * 2**20
    started, written, last_log = time.perf_counter(), 0, time.perf_counter()
    for file, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, tshape, _ in shard:
            n = numel(tshape) * size
            header[name] = {"dtype": st_dtype, "shape": list(tshape), "data_offsets": [offset, offset + n]}
            offset += n
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / file, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name, tshape, kind in shard:
                rows, row = tshape[0], numel(tshape[1:])
                step = max(1, chunk_elems // row)
                for start in range(0, rows, step):
                    chunk = torch.empty((min(step, rows - start), row), dtype=dtype)
                    chunk.normal_(0.0, 0.02, generator=generator)
                    if kind == "norm":
                        chunk.add_(1.0)
                    f.write(chunk.view(-1).view(torch.uint8).numpy().data)
                    written += chunk.numel() * size
                    del chunk
                if log and time.perf_counter() - last_log > 30:
                    last_log = time.perf_counter()
                    log(f"writing source: {fmt_bytes(written)} of {fmt_bytes(shape.weight_bytes())} "
                        f"({written / max(1e-9, last_log - started) / MiB:.0f} MiB/s), at {name}")
    if len(files) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": shape.weight_bytes()}, "weight_map": weight_map}, indent=2))
    return {"files": files, "seconds": time.perf_counter() - started, "bytes": safetensors_bytes(directory)}


def safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def read_headers(directory: Path) -> dict:
    """name -> (dtype string, shape) over every *.safetensors file of a directory."""
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
    return out


def dtype_check(src: Path, out: Path) -> dict:
    source, converted = read_headers(src), read_headers(out)
    changed = [n for n, v in source.items() if converted.get(n) != v]
    extra = {n: v for n, v in converted.items() if n not in source}
    extra_dtypes = sorted({v[0] for v in extra.values()})
    return {"kept": not changed, "changed": changed[:5], "head_tensors": len(extra), "head_dtypes": extra_dtypes,
            "head_bytes": sum(numel(v[1]) * {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}.get(v[0], 0) for v in extra.values())}
