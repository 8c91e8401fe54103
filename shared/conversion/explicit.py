"""The explicit construction (docs/DESIGN.md §8): an FFN as literal attention heads over a widened
residual, with full-width Q, K, V, O matrices and a plain causal softmax, for small models and
for reading.

Widened residual, per position (index 0 is the bias token, tokens follow from 1):

    [ x (D) | scratch (S) | one-hot position (P) | 1 ]          width W = D + S + P + 1

S is F for sites whose gate output must be carried to the product pairs (gated FFNs, squared
ReLU), else 0; P is the longest sequence the form accepts plus the bias token. The bias token has
x = 0, scratch = 0, position 0 and the constant 1.

Every head has dimension P + 1: P columns compare positions, the last column ("u") carries the
unit's pre-activation. Query at t, key at s:

    score(t, s) = qpos_t[s] + qu_t * ku_s
    qpos_t      = Omega e_t - Omega 1 + Omega e_0      (exactly 0 at s = t and s = 0, -Omega elsewhere)
    ku_s        = 1 - [s = 0]                          (the bias token's key is 0)
    qu_t        = a (w_k x_t + b_k) + c                (the compact head's key a u + c)

so the self score is a u + c, the bias token's is 0 and every other position's is at most
-Omega + max|a u + c|. Omega is the compact Omega plus EXTRA_OMEGA: those weights are e^-800 or
less, which is 0 in float64 and float32, so the softmax is exactly sigma(a u + c) on self. The
value is u at tokens and 0 at the bias token; O writes g * the down projection's column into x
(or g * e_k into scratch for a gate head). A bias head (score 0 on the bias token, -Omega on all
else, value 1) writes the down projection's bias.

Hosting: the source's class with an `ExplicitFFN` at `<site>.explicit` that takes the FFN's input
x (D) and returns what its heads write into the x channels: the widening, the bias token and the
narrowing happen inside the module; for a plain FFN the up projection's slot forwards to it and
the activation and down projection become identities; a gated FFN module is replaced by a host
that forwards to it. Mixture-of-experts sites have no explicit form (routed tokens have no order).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as Fn

EXTRA_OMEGA = 800.0  # e^-800 is 0 in float64 (below ~e^-745) and in float32


@dataclass(frozen=True)
class Layout:
    d_model: int
    scratch: int
    positions: int  # P: tokens + 1 (the bias token)

    @property
    def width(self) -> int:
        return self.d_model + self.scratch + self.positions + 1

    @property
    def head_dim(self) -> int:
        return self.positions + 1

    @property
    def pos0(self) -> int:
        return self.d_model + self.scratch

    @property
    def const(self) -> int:
        return self.width - 1

    @property
    def u(self) -> int:
        return self.positions  # the head column that carries the pre-activation

    def blocks(self) -> dict[str, slice]:
        """Channel blocks of the widened residual, by name (for explain)."""
        d, s, p = self.d_model, self.scratch, self.positions
        return {"x": slice(0, d), "scratch": slice(d, d + s), "position": slice(d + s, d + s + p),
                "const": slice(d + s + p, d + s + p + 1)}


@dataclass
class HeadRows:
    """H heads as rows over the widened residual (H, W): what qu, the value and O's u row read/write."""
    query: torch.Tensor
    value: torch.Tensor
    out: torch.Tensor
    see_self: torch.Tensor  # (H,) bool: neuron heads see themselves; the bias head only the bias token


def head_matrices(layout: Layout, rows: HeadRows, omega: float):
    """The literal matrices: q, k, v (H, W, P + 1) and o (H, P + 1, W), float64."""
    H, W, d, P, u = rows.query.shape[0], layout.width, layout.head_dim, layout.positions, layout.u
    q, k, v = (torch.zeros(H, W, d, dtype=torch.float64) for _ in range(3))
    o = torch.zeros(H, d, W, dtype=torch.float64)
    pos = torch.arange(P)
    q[:, layout.const, 1:P] = -omega  # -Omega on every key but the bias token's ...
    q[:, layout.pos0 + pos[1:], pos[1:]] = omega * rows.see_self.double()[:, None]  # ... and one's own (neuron heads)
    k[:, layout.pos0 + pos, pos] = 1.0
    k[:, layout.const, u], k[:, layout.pos0, u] = 1.0, -1.0  # ku = 1 - [s = 0]
    q[:, :, u] = rows.query
    v[:, :, u] = rows.value
    o[:, u, :] = rows.out
    return q, k, v, o


def affine_rows(layout: Layout, channels: slice, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(H, W) rows reading weight . channels + bias at tokens and exactly 0 at the bias token."""
    rows = torch.zeros(weight.shape[0], layout.width, dtype=torch.float64)
    rows[:, channels] = weight
    rows[:, layout.const], rows[:, layout.pos0] = bias, -bias
    return rows


def output_rows(layout: Layout, scale: torch.Tensor, columns: torch.Tensor, channels: slice) -> torch.Tensor:
    """(H, W): head h writes scale[h] * columns[h] into `channels`."""
    rows = torch.zeros(columns.shape[0], layout.width, dtype=torch.float64)
    rows[:, channels] = scale[:, None] * columns
    return rows


def neuron_rows(layout, w, b, a, c, g, value_w, value_b, out_cols, out_channels, key_channels) -> HeadRows:
    """Mixture heads (m, k), h = m F + k: key a_m (w_k . in + b_k) + c_m, value value_w_k . x + value_b_k,
    output g_m out_cols_k. w (F, len(key_channels)), a, c, g (M,), out_cols (F, len(out_channels))."""
    M, F = a.shape[0], w.shape[0]
    rep = lambda t: t.repeat(M, *([1] * (t.dim() - 1)))  # noqa: E731  (F, ...) -> (M F, ...)
    am, cm, gm = (t.repeat_interleave(F) for t in (a, c, g))  # (M F,)
    query = affine_rows(layout, key_channels, am[:, None] * rep(w), am * rep(b) + cm)
    query[:, layout.pos0] = 0.0  # the bias token's own query is never read
    value = affine_rows(layout, layout.blocks()["x"], rep(value_w), rep(value_b))
    out = output_rows(layout, gm, rep(out_cols), out_channels)
    return HeadRows(query, value, out, torch.ones(M * F, dtype=torch.bool))


def bias_rows(layout: Layout, bias: torch.Tensor) -> HeadRows:
    """One head that writes `bias` (D,) at every token: it sees only the bias token, value 1."""
    zero = torch.zeros(1, layout.width, dtype=torch.float64)
    value = zero.clone()
    value[0, layout.const] = 1.0
    out = zero.clone()
    out[0, :layout.d_model] = bias
    return HeadRows(zero, value, out, torch.zeros(1, dtype=torch.bool))


def cat_rows(parts: list[HeadRows]) -> HeadRows:
    return HeadRows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("query", "value", "out", "see_self")))


# --- the modules ----------------------------------------------------------------------------

class ExplicitLayer(nn.Module):
    """H heads over the widened residual; forward(X (B, T, W), past) -> (write (B, T, W), (K, V))."""

    def __init__(self, heads: int, layout: Layout, causal: bool, dtype=torch.float32):
        super().__init__()
        W, d = layout.width, layout.head_dim
        self.q, self.k, self.v = (nn.Parameter(torch.empty(heads, W, d, dtype=dtype), requires_grad=False)
                                  for _ in range(3))
        self.o = nn.Parameter(torch.empty(heads, d, W, dtype=dtype), requires_grad=False)
        self.causal = causal

    def forward(self, X: torch.Tensor, past=None):
        q, k, v = (torch.einsum("btw,hwd->bhtd", X, m) for m in (self.q, self.k, self.v))
        mask, causal = None, self.causal
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            S, T = k.shape[2], q.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=X.device).tril(S - T)  # query i is key S - T + i
            causal = False
        y = Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=1.0)
        return torch.einsum("bhtd,hdw->btw", y, self.o), (k, v)

    def pattern(self, X: torch.Tensor, head: int) -> torch.Tensor:
        """The softmax weights of one head on X (1, T, W): (T, T), row t over keys s."""
        scores = X[0] @ self.q[head] @ (X[0] @ self.k[head]).T
        if self.causal:
            T = scores.shape[0]
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
        return scores.softmax(-1)


class _DecodeState:
    def __init__(self, layers: int):
        self.seen, self.kv = 0, [None] * layers  # rows seen so far, the bias token included


class ExplicitFFN(nn.Module):
    """An FFN site in explicit form: forward(x (..., D)) -> what the heads write into x (..., D)."""

    is_attention_only = True

    def __init__(self, layout: Layout, heads_per_layer: list[int], causal: bool, context=None, dtype=torch.float32):
        super().__init__()
        self.layout, self.causal = layout, causal
        self.layers = nn.ModuleList(ExplicitLayer(h, layout, causal, dtype) for h in heads_per_layer)
        self.__dict__["context"] = context  # shared, not a submodule

    def widen(self, x: torch.Tensor, start: int, bias_token: bool) -> torch.Tensor:
        """(B, T, D) -> (B, [1 +] T, W): the bias token first when asked, positions from `start`."""
        L = self.layout
        B, T, D = x.shape
        rows = T + int(bias_token)
        if start + rows > L.positions:
            raise ValueError(f"the explicit form has position channels for {L.positions - 1} tokens; "
                             f"this call reaches token {start + rows - 1}")
        X = x.new_zeros(B, rows, L.width)
        X[:, rows - T:, :D] = x
        index = torch.arange(rows, device=x.device)
        X[:, index, L.pos0 + start + index] = 1.0
        X[:, :, L.const] = 1.0
        return X

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        ordered = x.dim() == 3
        x = x if ordered else x.reshape(-1, 1, shape[-1])  # tokens without order: each its own sequence
        state = self.context.state(self, lambda: _DecodeState(len(self.layers))) \
            if ordered and self.causal and self.context is not None else None
        first = state is None or state.seen == 0
        X = self.widen(x, 0 if first else state.seen, first)
        y = x.new_zeros(X.shape[:2] + (self.layout.d_model,))
        for i, layer in enumerate(self.layers):
            write, kv = layer(X, None if first else state.kv[i])
            if state is not None:
                state.kv[i] = kv
            X = X + write
            y = y + write[..., :self.layout.d_model]
        if state is not None:
            state.seen += X.shape[1]
        return (y[:, 1:] if first else y).reshape(shape)


class _Forward(nn.Module):
    """In a plain FFN's up-projection slot: hands the input to the site's ExplicitFFN."""

    def __init__(self, target: ExplicitFFN):
        super().__init__()
        self.__dict__["target"] = target  # registered once, at <site>.explicit

    def forward(self, x):
        return self.target(x)


class ExplicitHost(nn.Module):
    """In a gated FFN module's place: forward(x, ...) -> its ExplicitFFN's output."""

    is_attention_only = True

    def __init__(self, explicit: ExplicitFFN):
        super().__init__()
        self.explicit = explicit

    def forward(self, x, *args, **kwargs):
        return self.explicit(x)
