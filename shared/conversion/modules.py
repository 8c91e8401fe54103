"""Attention-head modules that take the place of FFNs inside transformers' own model classes.

    NeuronHeads   one head group (docs/DESIGN.md §2): replaces the activation between a plain
                  FFN's up and down projections, which become the heads' shared key/value
                  projection and their output projection
    GatedHeads    a gated FFN (§4): gate heads write s = act(gate x), product pairs form s * (up x)
    HeadExperts   a mixture-of-experts block's experts, each expert its own gated head group

A head module sees either a sequence (B, T, F): its heads use the source's mask (causal for
decoders, every real key for encoders); or tokens without an order (N, F), as inside
mixture-of-experts routing or a layer that flattens its batch: then each token's heads see
only the token itself and the null slot (no other key is visible, so there is no leakage).

During transformers' `generate()` the causal heads keep O(F) running sums per head (§6);
they live on that call's cache object (`DecodeContext`), so nothing leaks between calls.
"""
import torch
import torch.nn as nn

from . import fastpath, fastpath_pairs, heads as dense


class DecodeContext:
    """What the model's current top-level call carries that FFN modules never receive:
    the generation cache and the 2-D attention mask. Installed once per model."""

    def __init__(self, use_mask: bool = True):
        self.cache, self.mask, self.use_mask = None, None, use_mask

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._leave, always_call=True)

    def _enter(self, module, args, kwargs):
        cache = kwargs.get("cache")  # transformers 5 names it cache; earlier releases past_key_values
        self.cache = cache if cache is not None else kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        self.mask = mask if self.use_mask and isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _leave(self, module, args, output):
        self.cache = self.mask = None

    def state(self, owner: nn.Module, make):
        """The decoding state of `owner` for this cache, made on first use; None outside generation."""
        if self.cache is None:
            return None
        states = self.cache.__dict__.setdefault("_attention_only_states", {})
        if id(owner) not in states:
            states[id(owner)] = make()
        return states[id(owner)]

    def key_mask(self, seen: int, T: int):
        """(B, T) bool mask of real keys among the next T positions, or None."""
        if self.mask is None or self.mask.shape[1] != seen + T:
            return None
        return self.mask[:, seen:].bool()


def _self_only(u, a, c, g):
    """Each token sees only itself and the null slot: out = sum_m g_m u sigma(a_m u + c_m). u (N, F)."""
    a, c, g = (t.to(u.dtype) for t in (a, c, g))  # (M, F) or (M, 1)
    return (g * u[:, None, :] * torch.sigmoid(a * u[:, None, :] + c)).sum(1)  # (N, F)


class NeuronHeads(nn.Module):
    """M x F heads of dimension 1: head (m, k) has key a[m] u_k + c[m], value u_k, output scale
    g[m], self bias omega and a null slot. forward(u) with u = the up projection. One mixture
    serves every unit, so a, c, g are stored (M, 1) and broadcast over the F units."""

    def __init__(self, heads_per_unit: int, units: int, omega: float, causal: bool, context: DecodeContext | None):
        super().__init__()
        self.a = nn.Parameter(torch.ones(heads_per_unit, 1), requires_grad=False)  # (M, 1)
        self.c = nn.Parameter(torch.zeros(heads_per_unit, 1), requires_grad=False)
        self.g = nn.Parameter(torch.ones(heads_per_unit, 1), requires_grad=False)
        self.units, self.omega, self.causal, self.impl = units, float(omega), causal, "fast"
        self.__dict__["context"] = context  # shared, not a submodule

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.dim() != 3:
            return _self_only(u.reshape(-1, u.shape[-1]), self.a, self.c, self.g).view(u.shape)
        state = self.context.state(self, self._new_cache) if self.causal and self.context else None
        if state is not None:
            return state.step(u, u, self.context.key_mask(state.state.n if state.state else 0, u.shape[1]))
        mask = self.context.key_mask(0, u.shape[1]) if self.context else None
        group = fastpath.fast_head_group if self.impl == "fast" else dense.dense_head_group
        return group(u, u, *self._per_unit(), self.omega, causal=self.causal, key_padding_mask=mask)

    def _per_unit(self):
        """a, c, g as (M, F)."""
        return tuple(t.expand(-1, self.units) for t in (self.a, self.c, self.g))

    def _new_cache(self):
        return fastpath.HeadGroupCache(*self._per_unit(), self.omega)

    def extra_repr(self) -> str:
        M = self.a.shape[0]
        return f"heads={M}x{self.units}, omega={self.omega:.4g}, causal={self.causal}"


class ProductHeads(nn.Module):
    """Per unit a pair of heads keyed on +-eps s with values +-(2/eps) u: their sum is
    (2/eps) u tanh(eps s / 2) ~ s u (docs/DESIGN.md §4). forward(s, u), both (..., F)."""

    def __init__(self, units: int, omega: float, causal: bool, context: DecodeContext | None):
        super().__init__()
        self.eps = nn.Parameter(torch.ones(units), requires_grad=False)  # (F,)
        self.omega, self.causal, self.impl = float(omega), causal, "fast"
        self.__dict__["context"] = context

    def forward(self, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if s.dim() != 3:
            eps = self.eps.to(s.dtype)
            return (2.0 / eps) * u * torch.tanh(eps * s / 2.0)
        state = self.context.state(self, self._new_cache) if self.causal and self.context else None
        if state is not None:
            return state.step(s, u)
        mask = self.context.key_mask(0, s.shape[1]) if self.context else None
        pairs = fastpath_pairs.fast_product_pairs if self.impl == "fast" else dense.dense_product_pairs
        return pairs(s, u, self.eps, self.omega, causal=self.causal, key_padding_mask=mask)

    def _new_cache(self):
        return fastpath_pairs.ProductPairsCache(self.eps, self.omega)

    def extra_repr(self) -> str:
        return f"pairs={self.eps.shape[0]}, omega={self.omega:.4g}, causal={self.causal}"


class SquaredHeads(nn.Module):
    """Squared ReLU, relu(u) * u, in place of a plain FFN's activation: ReLU gate heads then
    product pairs with the value u (a gated FFN whose gate and up projections coincide)."""

    def __init__(self, gate_heads: NeuronHeads, product: ProductHeads):
        super().__init__()
        self.gate_heads, self.product = gate_heads, product

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.product(self.gate_heads(u), u)


class GatedHeads(nn.Module):
    """Takes the place of a gated FFN module. The source's projection modules stay children
    under their own names (so their weights keep their names and dtype); the activation and
    the product become gate heads and product pairs. The scratch channels that carry s from
    the gate heads to the product pairs are local to this module."""

    is_attention_only = True  # not an FFN, though it keeps the source's projection names

    def __init__(self, projections: dict[str, nn.Module], gate: str, up: str, down: str, fused: str | None,
                 gate_heads: NeuronHeads, product: ProductHeads):
        super().__init__()
        for name, module in projections.items():
            self.add_module(name, module)
        self.gate_name, self.up_name, self.down_name, self.fused_name = gate, up, down, fused
        self.gate_heads, self.product = gate_heads, product

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fused_name:
            gate, up = getattr(self, self.fused_name)(x).chunk(2, dim=-1)  # the gated half first
        else:
            gate, up = getattr(self, self.gate_name)(x), getattr(self, self.up_name)(x)
        s = self.gate_heads(gate)  # (.., F): the scratch channels
        product = self.product(s, up)
        return getattr(self, self.down_name)(product) if self.down_name else product


def expert_projection(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """One expert's projection: weight (out, in) as nn.Linear keeps it, or (in, out) when transposed."""
    return x @ weight if transposed else nn.functional.linear(x, weight)


class HeadExperts(nn.Module):
    """Takes the place of transformers' fused experts module (gate_up_proj (E, 2F, D), down_proj
    (E, D, F)); same call signature. Routed tokens have no order: each expert's heads see a
    token and the null slot only."""

    is_attention_only = True  # not an FFN, though it keeps the source's projection names

    def __init__(self, experts: int, units: int, d_model: int, heads_per_unit: int, transposed: bool = False):
        super().__init__()
        self.num_experts, self.transposed = experts, transposed  # transposed: the source's (E, D, 2F), (E, F, D)
        gate_up, down = ((d_model, 2 * units), (units, d_model)) if transposed else ((2 * units, d_model), (d_model, units))
        self.gate_up_proj = nn.Parameter(torch.empty(experts, *gate_up), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(experts, *down), requires_grad=False)
        self.a = nn.Parameter(torch.ones(experts, heads_per_unit, 1), requires_grad=False)  # (E, M, 1)
        self.c = nn.Parameter(torch.zeros(experts, heads_per_unit, 1), requires_grad=False)
        self.g = nn.Parameter(torch.ones(experts, heads_per_unit, 1), requires_grad=False)
        self.eps = nn.Parameter(torch.ones(experts, units), requires_grad=False)  # (E, F)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (N, D) -> (N, D)."""
        gate, up = expert_projection(x, self.gate_up_proj[e], self.transposed).chunk(2, dim=-1)  # (N, F) each
        s = _self_only(gate, self.a[e], self.c[e], self.g[e])
        eps = self.eps[e].to(x.dtype)
        return expert_projection((2.0 / eps) * up * torch.tanh(eps * s / 2.0), self.down_proj[e], self.transposed)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)  # (N, D)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            y = self.expert(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
