"""`attnonly explain OUT --layer L --unit K`: one FFN unit's head in both forms, for reading.

    compact   its mixture terms (a, c, g), the key and value vectors it shares with the FFN, Omega
    explicit  its literal Q, K, V, O matrices over the widened residual (stored ones for an
              explicit directory, built the same way as the conversion builds them otherwise):
              the nonzero blocks and their values
    pattern   the explicit head's softmax weights on an example sequence (query position x key
              position, 0 is the bias token), the weight on self next to sigma(a u + c), and the
              compact head's weights (self, null slot, the largest leak) on the same tokens

The figure (SVG or PNG by the file's suffix) shows both patterns and the nonzero structure of the
four matrices; `figure_html` is the same for report.html.
"""
import math
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from . import explicit_build, host
from .errors import InvalidOptionsError
from .explicit import ExplicitFFN, Layout
from .explicit_convert import hook_input, load_site
from .format import SECTION, read_config
from .patterns import Plain, Site, find_sites

EXAMPLE_TOKENS = 8
COMPACT_TOKENS = 32  # a compact directory's unit is shown with position channels for this many tokens
COMPACT_MAX_PARAMS = 50_000_000


@dataclass
class ExplicitHead:
    layer: int  # the ExplicitFFN layer (0: neuron or gate heads, 1: product pairs)
    index: int  # the head within it
    role: str
    q: torch.Tensor  # (W, d)
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # (d, W)


@dataclass
class UnitExplanation:
    site: str
    layer: int
    unit: int
    kind: str
    activation: str
    compact: dict  # a, c, g (lists over m), omega, |w_k|, b_k, |W2[:, k]|, and eps / product_omega for two-layer sites
    layout: Layout
    omega: float  # the explicit form's
    heads: list[ExplicitHead]
    tokens: list[int]
    score: torch.Tensor  # (T,): the first head's self score a u + c at each token
    pattern: torch.Tensor  # (T + 1, T + 1): the first explicit head's weights, row = query, column = key
    compact_pattern: torch.Tensor  # (T, T + 1): the compact head (0, k): keys 0..T-1, then the null slot
    stored: bool  # the explicit matrices are the directory's own


def _site(model, section: dict, layer: int) -> tuple[Site, dict]:
    config = model.config
    cls = type(model)
    sites = find_sites(host.build_empty(cls, config, torch.float64), causal=host.is_causal(cls, config),
                       encoder_decoder=host.is_encoder_decoder(cls, config))
    for site, plan in zip(sites, section["sites"]):
        if site.layer == layer:
            return site, plan
    raise InvalidOptionsError(f"no FFN site in layer {layer}; layers: {sorted({s.layer for s in sites})}")


def _unit_heads(site: Site, plan: dict, unit: int) -> list[tuple[int, int, str]]:
    """(layer, head index, role) of every explicit head of `unit`."""
    F, M = site.units, plan["heads_per_unit"]
    first = "gate head" if plan["explicit_layers"] == 2 else "neuron head"
    heads = [(0, m * F + unit, f"{first} m={m}") for m in range(M)]
    if plan["explicit_layers"] == 2:
        keys = explicit_build.PAIR_KEYS
        heads += [(1, j * F + unit, f"product head, key {keys[j]:+g} eps s") for j in range(len(keys))]
    return heads


def explain(out_dir, layer: int, unit: int, token_ids: list[int] | None = None,
            dtype: str = "float64") -> UnitExplanation:
    from .runtime import load_converted

    section = read_config(out_dir)[SECTION]
    model = load_converted(out_dir, dtype=dtype, construction="compact")  # real source modules, compact heads
    site, plan = _site(model, section, layer)
    if not 0 <= unit < site.units:
        raise InvalidOptionsError(f"{site.path} has units 0..{site.units - 1}, not {unit}")
    compute = next(model.parameters()).dtype
    module = model.get_submodule(site.path)
    tensors = {n: p.detach() for n, p in model.get_submodule(host.head_module_names(site)).named_parameters()
               if n.split(".")[-1] in ("a", "c", "g", "eps")}
    stored = "explicit" in plan
    if stored:
        ffn = load_site(out_dir, site, plan, compute)
        entry = plan["explicit"]
    else:  # a compact directory: the matrices an explicit conversion would write, for COMPACT_TOKENS tokens
        layout, has_bias = explicit_build.site_layout(model, site, COMPACT_TOKENS)
        size = explicit_build.params(layout, explicit_build.heads_per_layer(site, plan["heads_per_unit"], has_bias))
        if size > COMPACT_MAX_PARAMS:
            raise InvalidOptionsError(f"{site.path}'s explicit form would have {size:,} parameters (over "
                                      f"{COMPACT_MAX_PARAMS:,}); explain reads it from explicit conversions only")
        entry, layers = explicit_build.build_site(site, plan, tensors, module, layout, has_bias, compute)
        ffn = ExplicitFFN(layout, entry["heads"], site.causal, None, compute)
        for layer_module, matrices in zip(ffn.layers, layers):
            for name, matrix in zip("qkvo", matrices):
                getattr(layer_module, name).data = matrix.to(compute)
    layout = explicit_build.layout_of(entry)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    tokens = token_ids or torch.randint(0, vocab, (EXAMPLE_TOKENS,), generator=generator).tolist()
    if len(tokens) > layout.positions - 1:
        raise InvalidOptionsError(
            f"the explicit form has positions for {layout.positions - 1} tokens, not {len(tokens)}")
    seen = []
    handle = hook_input(model, site, lambda s, x: seen.append(x.detach()))
    try:
        with torch.no_grad():
            ids = torch.tensor([tokens])
            inputs = {"input_ids": ids}
            if host.is_encoder_decoder(type(model), model.config):
                inputs["decoder_input_ids"] = ids
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    x = seen[-1][:1]
    plan = {**plan, "explicit_layers": len(entry["heads"])}
    heads = [ExplicitHead(i, h, role, *(getattr(ffn.layers[i], m)[h].detach() for m in "qkvo"))
             for i, h, role in _unit_heads(site, plan, unit)]
    with torch.no_grad():
        X = ffn.widen(x, 0, True)  # (1, T + 1, W)
        first = heads[0]
        pattern = ffn.layers[0].pattern(X, first.index)
        score = (X[0, 1:] @ first.q[:, layout.u])  # a u + c: the self score
    prefix = "gate_heads." if plan["explicit_layers"] == 2 else ""
    a, c, g = (tensors[prefix + n].double()[:, 0].tolist() for n in "acg")
    compact = {"a": a, "c": c, "g": g, "omega": plan["omega"], **_vectors(site, module, unit)}
    if plan["explicit_layers"] == 2:
        compact.update(eps=float(tensors["product.eps"][unit]), product_omega=plan["product_omega"])
        entry_eps = entry.get("eps")
        if entry_eps is not None:
            compact["explicit_eps"] = entry_eps
    return UnitExplanation(site.path, layer, unit, site.pattern.kind, site.activation, compact, layout, entry["omega"],
                           heads, tokens, score.double(), pattern.double(),
                           _compact_pattern(score.double(), plan["omega"], site.causal), stored)


def _vectors(site: Site, module, unit: int) -> dict:
    """The FFN's own rows the compact head shares: the key/value row w_k, b_k and the output column."""
    p = site.pattern
    first = p.up if isinstance(p, Plain) else (p.fused or p.gate)
    w, b = explicit_build.affine(module.get_submodule(first))
    down, _ = explicit_build.affine(module.get_submodule(p.down))
    return {"w_norm": float(w[unit].norm()), "b": float(b[unit]), "w_head": w[unit, :4].tolist(),
            "out_norm": float(down[:, unit].norm())}


def _compact_pattern(z: torch.Tensor, omega: float, causal: bool) -> torch.Tensor:
    """The compact head's weights: query t over keys j (score z_j, + Omega on j = t) and the null slot (Omega)."""
    T = z.shape[0]
    scores = z[None, :].expand(T, T).clone() + omega * torch.eye(T, dtype=z.dtype)
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.cat((scores, torch.full((T, 1), omega, dtype=z.dtype)), dim=1).softmax(-1)


# --- text ---------------------------------------------------------------------------------------

def _blocks(matrix: torch.Tensor, rows: dict, cols: dict) -> list[str]:
    lines = []
    for rname, rs in rows.items():
        for cname, cs in cols.items():
            block = matrix[rs, cs]
            nz = block != 0
            count = int(nz.sum())
            if not count:
                continue
            values = block[nz]
            diagonal = block.shape[0] == block.shape[1] and bool((nz == torch.diag(torch.diag(nz))).all())
            shape = "diagonal, " if diagonal and count > 1 else ""
            span = f"{float(values.min()):.6g}" if float(values.min()) == float(values.max()) else \
                f"{float(values.min()):.6g} .. {float(values.max()):.6g}"
            lines.append(f"      {rname:>8} -> {cname:<9} {count:5d} nonzero ({shape}{span})")
    return lines


def render_text(e: UnitExplanation) -> str:
    L = e.layout
    c = e.compact
    head_cols = {"positions": slice(0, L.positions), "u": slice(L.u, L.u + 1)}
    channels = {k: v for k, v in L.blocks().items() if v.stop > v.start}
    out = [f"unit {e.unit} of {e.site} (layer {e.layer}, {e.kind} FFN, {e.activation})", "",
           "compact form (docs/DESIGN.md §2): heads (m, k) of dimension 1, query 1",
           f"  key a_m u_k + c_m, u_k = w_k . x + b_k   |w_k| = {c['w_norm']:.6g}, b_k = {c['b']:.6g}, "
           f"w_k[:4] = {[round(v, 6) for v in c['w_head']]}",
           f"  value u_k; output g_m * W_down[:, k]    |W_down[:, k]| = {c['out_norm']:.6g}",
           f"  self bias Omega = {c['omega']:.6g}; a null slot (score Omega, value 0)"]
    out += [f"  m={m}: a = {a:.9g}, c = {cc:.9g}, g = {g:.9g}"
            for m, (a, cc, g) in enumerate(zip(c["a"], c["c"], c["g"]))]
    if "eps" in c:
        out.append(f"  product pair: keys +-eps s_k, values +-(2/eps) u_k, eps = {c['eps']:.6g}, "
                   f"Omega = {c['product_omega']:.6g}")
    out += ["", f"explicit form (docs/DESIGN.md §8){'' if e.stored else ' (built: this directory is compact)'}: "
            f"widened residual W = {L.d_model} + {L.scratch} + {L.positions} + 1 = {L.width} "
            f"(x, scratch, one-hot positions with 0 the bias token, constant); head dimension {L.head_dim}; "
            f"Omega = {e.omega:.6g}"]
    if "explicit_eps" in c:
        out.append(f"  product heads' eps = {c['explicit_eps']:.6g} (two pairs per unit, Richardson-combined)")
    for head in e.heads:
        out.append(f"  layer {head.layer}, head {head.index}: {head.role}")
        for name, matrix in (("W_Q", head.q), ("W_K", head.k), ("W_V", head.v)):
            out.append(f"    {name} ({L.width} x {L.head_dim}), rows: residual channels, columns: head dimensions")
            out += _blocks(matrix, channels, head_cols)
        out.append(f"    W_O ({L.head_dim} x {L.width}), rows: head dimensions, columns: residual channels")
        out += _blocks(head.o.T, channels, head_cols)
    T = len(e.tokens)
    out += ["", f"attention pattern of the explicit {e.heads[0].role} on tokens {e.tokens}",
            "  (row: query position, column: key position; 0 is the bias token)",
            "       " + " ".join(f"{j:>7d}" for j in range(T + 1))]
    out += [f"  {i:>4d} " + " ".join(f"{float(w):7.4f}" for w in row) for i, row in enumerate(e.pattern)]
    out += ["", "  position  self score a u + c        weight on self           sigma(a u + c)           "
            "weight on bias token", ]
    for t in range(T):
        z = float(e.score[t])
        out.append(f"  {t + 1:>8d}  {z!r:<24} {float(e.pattern[t + 1, t + 1])!r:<24} "
                   f"{1 / (1 + math.exp(-z))!r:<24} {float(e.pattern[t + 1, 0])!r}")
    leak = e.compact_pattern[:, :T].clone()
    leak[torch.arange(T), torch.arange(T)] = 0
    on_self = e.compact_pattern[:, :T].diagonal()
    out += ["", f"compact head (0, {e.unit}) on the same tokens: weight on self "
            f"{float(on_self.min()):.6g} .. {float(on_self.max()):.6g}, "
            f"on the null slot {float(e.compact_pattern[:, T].min()):.6g} .. {float(e.compact_pattern[:, T].max()):.6g}, "
            f"largest on another token {float(leak.max()):.3g}"]
    return "\n".join(out)


# --- figure ---------------------------------------------------------------------------------------

def figure(e: UnitExplanation) -> Figure:
    fig = Figure(figsize=(11, 6.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.15, 1))
    ax1, ax2 = top.subplots(1, 2)
    T = len(e.tokens)
    for ax, weights, title, xlabels in (
            (ax1, e.pattern, f"explicit {e.heads[0].role}: softmax weights", ["bias"] + [str(t) for t in range(1, T + 1)]),
            (ax2, e.compact_pattern, f"compact head (0, {e.unit}): weights", [str(t) for t in range(1, T + 1)] + ["null"])):
        image = ax.imshow(weights.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
        rows = weights.shape[0]
        ax.set_yticks(range(rows), (["bias"] if rows == T + 1 else []) + [str(t) for t in range(1, T + 1)], fontsize=7)
    top.colorbar(image, ax=[ax1, ax2], shrink=0.8, label="weight")
    head = e.heads[0]
    axes = bottom.subplots(1, 4)
    L = e.layout
    for ax, (name, matrix) in zip(axes, (("W_Q", head.q), ("W_K", head.k), ("W_V", head.v), ("W_O (transposed)", head.o.T))):
        ax.imshow((matrix != 0).numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
        for edge in (L.d_model, L.pos0, L.const):
            ax.axhline(edge - 0.5, color="#cf222e", linewidth=0.6)
        ax.axvline(L.u - 0.5, color="#cf222e", linewidth=0.6)
        ax.set_title(f"{name}: nonzero", fontsize=9)
        ax.set_xlabel("head dim (positions | u)", fontsize=8)
        ax.set_ylabel("residual (x | scratch | pos | 1)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"unit {e.unit} of {e.site} (layer {e.layer}, {e.activation}); Omega = {e.omega:.4g}", fontsize=10)
    return fig


def write_figure(e: UnitExplanation, path) -> None:
    figure(e).savefig(str(path))


def figure_html(e: UnitExplanation) -> str:
    """A report.html section: the figure inline and the text."""
    from html import escape

    from .report_plots import figure_html, svg_of

    svg = svg_of(figure(e), f"explain-{e.layer}-{e.unit}")
    return (f"<h2>Unit {e.unit} of layer {e.layer}, in both forms</h2>"
            + figure_html(svg, f"{e.site}: the explicit head's attention pattern, the compact head's, and the nonzero "
                      "structure of the explicit head's matrices (red lines: block boundaries).")
            + f"<div class='wide'><pre class='mono'>{escape(render_text(e))}</pre></div>")
