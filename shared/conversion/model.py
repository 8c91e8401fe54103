"""The attention-only runtime, nanoGPT-style: embeddings, then blocks whose sublayers are
softmax attention and normalisation only, then the output head.

A converted FFN is one or two sublayers of dimension-1 heads (DESIGN.md §2, §4):
  NeuronSublayer   one head per (unit, mixture term): key a*u+c, value u, self bias omega, null slot
  GateSublayer     the same heads, written into the residual's scratch channels (gated FFNs)
  ProductSublayer  ±eps head pairs forming s*u, plus identity heads that clear the scratch channels
The residual of a gated model is D content channels plus F scratch channels; the runtime
keeps the scratch channels as a second tensor because norms never read them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fastpath, heads


# --- normalisation and embeddings -------------------------------------------------

class Norm(nn.Module):
    """LayerNorm or RMSNorm over the content channels."""

    def __init__(self, kind: str, d_model: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d_model), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_model), requires_grad=False) if kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        # exactly as transformers' RMSNorm: normalise in float32 (even for float64 models),
        # scale after casting back
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Embedding(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        D, emb = arch["d_model"], arch["embedding"]
        self.tokens = nn.Embedding(arch["vocab_size"], D)
        self.positions = nn.Embedding(arch["max_positions"], D) if emb["positions"] == "learned" else None
        self.token_types = nn.Embedding(emb["token_types"], D) if emb["token_types"] else None
        self.norm = Norm(arch["norm"]["kind"], D, arch["norm"]["eps"]) if emb["norm"] else None

    def forward(self, input_ids, positions, token_type_ids=None):
        x = self.tokens(input_ids)  # (B, T, D)
        if self.positions is not None:
            x = x + self.positions(positions)[None]
        if self.token_types is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_types(types)
        return self.norm(x) if self.norm is not None else x


# --- the source's own attention ---------------------------------------------------

def rotary_inverse_frequencies(rotary: dict, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rotary["theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rotary["type"] == "linear":
        inv_freq = inv_freq / rotary["factor"]
    elif rotary["type"] == "llama3":
        factor, old_len = rotary["factor"], rotary["original_max_position_embeddings"]
        low, high = rotary["low_freq_factor"], rotary["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < old_len / high) & ~(wavelength > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SourceAttention(nn.Module):
    """Multi-head (grouped-query) attention exactly as the source family computes it."""

    def __init__(self, arch: dict, layer_index: int):
        super().__init__()
        att, D = arch["attention"], arch["d_model"]
        self.n_heads, self.n_kv_heads, self.head_dim = att["n_heads"], att["n_kv_heads"], att["head_dim"]
        self.causal = arch["kind"] == "decoder"
        self.sliding_window = att["sliding_window"]
        self.scale = att["scale"] / (layer_index + 1 if att["scale_by_inverse_layer_idx"] else 1)
        self.q = nn.Linear(D, self.n_heads * self.head_dim, bias=att["bias_qkv"])
        self.k = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=att["bias_qkv"])
        self.v = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=att["bias_qkv"])
        self.o = nn.Linear(self.n_heads * self.head_dim, D, bias=att["bias_o"])
        self.rotary = att["rotary"]
        if self.rotary is not None:
            self.register_buffer("inv_freq", rotary_inverse_frequencies(self.rotary, self.head_dim), persistent=False)

    def rotate(self, x, positions):
        # transformers builds cos/sin in float32 whatever the model dtype; do the same
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def forward(self, x, positions, key_padding_mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotate(q, positions), self.rotate(k, positions)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, Hkv, S, hd) with S = past + T
        S = k.shape[2]
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        mask = self.mask(T, S, x.device, key_padding_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def mask(self, T, S, device, key_padding_mask):
        """Boolean (.., T, S) mask, True = may attend; None when everything is visible."""
        allowed = None
        if self.causal:
            query_pos = torch.arange(S - T, S, device=device)[:, None]
            key_pos = torch.arange(S, device=device)[None, :]
            allowed = key_pos <= query_pos
            if self.sliding_window is not None:
                allowed = allowed & (query_pos - key_pos < self.sliding_window)
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, S)
            allowed = padding if allowed is None else allowed & padding
        return allowed


class KeyValueCache:
    def __init__(self):
        self.k = self.v = None

    def extend(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


# --- FFNs as attention ---------------------------------------------------------------

class HeadGroup(nn.Module):
    """M*F dimension-1 heads: head (m, k) has key a[m,k]*keys[..,k] + c[m,k], value values[..,k],
    output scale g[m,k], self-position bias omega and (optionally) a null slot."""

    def __init__(self, heads_per_unit: int, units: int, omega: float, causal: bool, null_slot: bool = True):
        super().__init__()
        self.a = nn.Parameter(torch.ones(heads_per_unit, units), requires_grad=False)  # (M, F)
        self.c = nn.Parameter(torch.zeros(heads_per_unit, units), requires_grad=False)
        self.g = nn.Parameter(torch.ones(heads_per_unit, units), requires_grad=False)
        self.omega, self.causal, self.null_slot = omega, causal, null_slot
        self.impl = "fast"

    def forward(self, keys, values, key_padding_mask=None, cache=None):
        if cache is not None:
            return cache.step(keys, values)
        group = fastpath.fast_head_group if self.impl == "fast" else heads.dense_head_group
        return group(keys, values, self.a, self.c, self.g, self.omega, causal=self.causal,
                     key_padding_mask=key_padding_mask, null_slot=self.null_slot)  # (B, T, F)

    def new_cache(self):
        return fastpath.HeadGroupCache(self.a, self.c, self.g, self.omega, null_slot=self.null_slot)


class NeuronSublayer(nn.Module):
    """A plain FFN W2 phi(W1 x + b1) + b2 as one head group: u = W1 x + b1 is key and value."""

    def __init__(self, d_model: int, spec: dict, causal: bool, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(d_model, spec["units"], bias=bias)
        self.heads = HeadGroup(spec["heads_per_unit"], spec["units"], spec["omega"], causal)
        self.w2 = nn.Linear(spec["units"], d_model, bias=bias)

    def forward(self, x, key_padding_mask=None, cache=None):
        u = self.w1(x)  # (B, T, F)
        return self.w2(self.heads(u, u, key_padding_mask, cache))  # (B, T, D)


class GateSublayer(nn.Module):
    """Writes s = act(W_gate x) into the scratch channels through one head group."""

    def __init__(self, d_model: int, spec: dict, causal: bool, bias: bool):
        super().__init__()
        self.gate = nn.Linear(d_model, spec["units"], bias=bias)
        self.heads = HeadGroup(spec["heads_per_unit"], spec["units"], spec["omega"], causal)

    def forward(self, x, key_padding_mask=None, cache=None):
        g = self.gate(x)  # (B, T, F)
        return self.heads(g, g, key_padding_mask, cache)  # (B, T, F) into scratch


class ProductSublayer(nn.Module):
    """W_down (s * (W_up x)) through ±eps head pairs keyed on the scratch channels s, plus
    identity heads (no null slot, value s, scale -1) that clear the scratch channels."""

    def __init__(self, d_model: int, spec: dict, causal: bool, bias: bool):
        super().__init__()
        F_ = spec["units"]
        self.up = nn.Linear(d_model, F_, bias=bias)
        self.eps = nn.Parameter(torch.ones(F_), requires_grad=False)  # (F,)
        self.down = nn.Linear(F_, d_model, bias=bias)
        self.omega, self.causal = spec["omega"], causal
        self.clear = HeadGroup(1, F_, spec["identity_omega"], causal, null_slot=False)
        nn.init.zeros_(self.clear.a)
        nn.init.constant_(self.clear.g, -1.0)
        self.impl = "fast"

    def forward(self, x, scratch, key_padding_mask=None, cache=None):
        u = self.up(x)  # (B, T, F)
        if cache is not None:
            product = cache.pairs.step(scratch, u)
            cleared = self.clear(scratch, scratch, cache=cache.clear)
        else:
            pairs = fastpath.fast_product_pairs if self.impl == "fast" else heads.dense_product_pairs
            product = pairs(scratch, u, self.eps, self.omega, causal=self.causal, key_padding_mask=key_padding_mask)
            cleared = self.clear(scratch, scratch, key_padding_mask)
        return self.down(product), cleared  # (B, T, D) into content, (B, T, F) into scratch

    def new_cache(self):
        return ProductCache(fastpath.ProductPairsCache(self.eps, self.omega), self.clear.new_cache())


class ProductCache:
    def __init__(self, pairs, clear):
        self.pairs, self.clear = pairs, clear


# --- blocks and the model ---------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, arch: dict, layer: dict, index: int):
        super().__init__()
        D, norm, causal, bias = arch["d_model"], arch["norm"], arch["kind"] == "decoder", arch["ffn"]["bias"]
        self.post_norm = arch["placement"] == "post"
        self.attn_norm = Norm(norm["kind"], D, norm["eps"])
        self.attn = SourceAttention(arch, index)
        self.ffn_norm = Norm(norm["kind"], D, norm["eps"])
        kinds = [s["kind"] for s in layer["sublayers"]]
        specs = {s["kind"]: s for s in layer["sublayers"]}
        self.gated = "gate" in kinds
        if self.gated:
            assert kinds == ["attention", "gate", "product"], kinds
            self.gate = GateSublayer(D, specs["gate"], causal, bias)
            self.product = ProductSublayer(D, specs["product"], causal, bias)
        else:
            assert kinds == ["attention", "neuron"], kinds
            self.ffn = NeuronSublayer(D, specs["neuron"], causal, bias)

    def forward(self, x, scratch, positions, key_padding_mask=None, cache=None):
        c = cache or {}
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, positions, key_padding_mask, c.get("attn")))
            return self.ffn_norm(x + self.ffn_output(x, scratch, key_padding_mask, c)[0]), scratch
        x = x + self.attn(self.attn_norm(x), positions, key_padding_mask, c.get("attn"))
        delta, scratch = self.ffn_output(self.ffn_norm(x), scratch, key_padding_mask, c)
        return x + delta, scratch

    def ffn_output(self, h, scratch, key_padding_mask, cache):
        """The converted FFN on normalised content h: (content delta, new scratch)."""
        if not self.gated:
            return self.ffn(h, key_padding_mask, cache.get("ffn")), scratch
        scratch = scratch + self.gate(h, key_padding_mask, cache.get("gate"))
        delta, cleared = self.product(h, scratch, key_padding_mask, cache.get("product"))
        return delta, scratch + cleared

    def new_cache(self):
        cache = {"attn": KeyValueCache()}
        if self.gated:
            cache.update(gate=self.gate.heads.new_cache(), product=self.product.new_cache())
        else:
            cache["ffn"] = self.ffn.heads.new_cache()
        return cache


class ConvertedModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        arch = self.arch = config["model"]
        self.is_decoder = arch["kind"] == "decoder"
        self.scratch_width = arch["ffn"]["width"] if arch["ffn"]["kind"] == "gated" else 0
        self.embed = Embedding(arch)
        self.layers = nn.ModuleList(Block(arch, layer, i) for i, layer in enumerate(config["layers"]))
        self.final_norm = Norm(arch["norm"]["kind"], arch["d_model"], arch["norm"]["eps"]) if arch["final_norm"] else None
        self.lm_head = nn.Linear(arch["d_model"], arch["vocab_size"], bias=False) if arch["lm_head"] == "separate" else None

    def set_head_impl(self, impl: str):
        """'fast' (exact O(n) evaluation, the default) or 'dense' (ordinary SDPA per head, the reference)."""
        assert impl in ("fast", "dense")
        for module in self.modules():
            if isinstance(module, (HeadGroup, ProductSublayer)):
                module.impl = impl

    def residual_stream(self, input_ids, attention_mask=None, token_type_ids=None, start=0, caches=None):
        """Yields the content channels after the embeddings and after every block."""
        B, T = input_ids.shape
        positions = torch.arange(start, start + T, device=input_ids.device)
        x = self.embed(input_ids, positions, token_type_ids)  # (B, T, D)
        scratch = x.new_zeros(B, T, self.scratch_width) if self.scratch_width else None  # (B, T, F)
        yield x
        for i, block in enumerate(self.layers):
            x, scratch = block(x, scratch, positions, attention_mask, caches[i] if caches else None)
            yield x

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start=0, caches=None):
        """Logits (B, T, V) for models with an output head, else last hidden states (B, T, D)."""
        for x in self.residual_stream(input_ids, attention_mask, token_type_ids, start, caches):
            pass
        return self.head(x)

    def head(self, x):
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.arch["lm_head"] == "none":
            return x
        weight = self.lm_head.weight if self.lm_head is not None else self.embed.tokens.weight
        return F.linear(x, weight)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int):
        """Greedy decoding with caches: a growing key/value cache for the source attention,
        O(F) running sums per neuron head group."""
        assert self.is_decoder and self.arch["lm_head"] != "none", "generate() needs a decoder with an output head"
        limit = self.arch["max_positions"]
        if input_ids.shape[1] + max_new_tokens > limit:
            raise ValueError(f"prompt + new tokens exceed the model's {limit} positions")
        caches = [block.new_cache() for block in self.layers]
        out, step_ids, start = [input_ids], input_ids, 0
        for _ in range(max_new_tokens):
            logits = self.forward(step_ids, start=start, caches=caches)  # the prompt in one pass, then one token
            start += step_ids.shape[1]
            step_ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(step_ids)
        return torch.cat(out, dim=1)
