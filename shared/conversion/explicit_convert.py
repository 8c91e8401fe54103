"""What convert() does for construction "explicit" (docs/DESIGN.md §8), apart from the compact
form it also writes: the explicit matrices of every site, the local check of the explicit heads
against the source module, and the explicit model against the compact one, layer by layer.
The matrices are built and stored on the CPU; the checks compute on the conversion's device.
"""
import torch
import torch.nn as nn

from . import checks, explicit_build
from .checkpoint import SourceCheckpoint
from .explicit import ExplicitFFN
from .patterns import Plain, Site, relative_error
from .sitework import SiteWork


def build(source, results, options) -> tuple[dict, dict]:
    """({tensor name: tensor in the compute dtype}, the config section's "explicit" entry). Adds each
    site's "explicit" entry to its plan; refuses the form when the planned heads exceed the limit."""
    heads_per_unit = [r.plan["heads_per_unit"] for r in results]
    total = explicit_build.guard(source.probe, source.sites, source.max_positions, options.explicit_max_params,
                                 heads_per_unit)
    tensors = {}
    for result in results:
        site = result.site
        layout, has_bias = explicit_build.site_layout(source.probe, site, source.max_positions)
        module = SiteWork(site, source.probe, source.weights, torch.device("cpu"))._module(None, torch.float64)
        entry, layers = explicit_build.build_site(site, result.plan, result.tensors, module, layout, has_bias,
                                                  source.dtype)
        result.plan["explicit"] = entry
        for names, matrices in zip(explicit_build.tensor_names(site, len(layers)), layers):
            tensors.update({n: m.to(source.dtype) for n, m in zip(names, matrices)})
    return tensors, {"tokens": source.max_positions, "params": total, "max_params": options.explicit_max_params}


def load_site(out_dir, site: Site, plan: dict, dtype: torch.dtype, device="cpu") -> ExplicitFFN:
    """A site's ExplicitFFN with its stored matrices on `device` (no decoding context)."""
    entry = plan["explicit"]
    module = ExplicitFFN(explicit_build.layout_of(entry), entry["heads"], site.causal, None)
    checkpoint = SourceCheckpoint(out_dir)
    for names, layer in zip(explicit_build.tensor_names(site, len(entry["heads"])), module.layers):
        for name, attribute in zip(names, "qkvo"):
            getattr(layer, attribute).data = checkpoint.tensor(name).to(device=device, dtype=dtype)
    return module.eval()


def hook_input(model: nn.Module, site: Site, on_input) -> torch.utils.hooks.RemovableHandle:
    """Call on_input(site, x) with the FFN's input x in model's forward passes."""
    if isinstance(site.pattern, Plain):
        target = model.get_submodule(site.join(site.pattern.up))
        return target.register_forward_pre_hook(lambda m, args: on_input(site, args[0]))
    return model.get_submodule(site.path).register_forward_pre_hook(
        lambda m, args, kwargs: on_input(site, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)


class LocalCheck:
    """Each site's explicit heads against the source module in float64, on the FFN's inputs."""

    def __init__(self, probe, weights, plans: dict, out_dir, dtype: torch.dtype, device: torch.device):
        self.probe, self.weights, self.plans, self.out_dir, self.dtype = probe, weights, plans, out_dir, dtype
        self.device = device  # where the pass's inputs are, and the heads are evaluated
        self.errors: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, site: Site, x: torch.Tensor) -> None:
        work = SiteWork(site, self.probe, self.weights, self.device)
        if isinstance(site.pattern, Plain):
            u = work._module(site.pattern.up, torch.float64)(x.double())
            reference = work.reference((u,))
        else:
            reference = work.reference((x,))
        ours = load_site(self.out_dir, site, self.plans[site.path], self.dtype, self.device)(x.to(self.dtype))
        self.errors[site.path] = max(relative_error(ours, reference), self.errors.get(site.path, 0.0))

    def hooks(self, model: nn.Module, sites: list[Site]) -> list:
        return [hook_input(model, site, self) for site in sites]


def versus_compact(explicit_out, out_dir, batch, options, encoder_decoder: bool, device: torch.device) -> list[dict]:
    """The explicit model's hidden states (on the CPU, from checks.run) against the compact form's
    (the same directory loaded compact, run on `device`), per layer: max |difference| and max
    relative difference."""
    from .runtime import load_converted

    compact = load_converted(out_dir, device=device, dtype=options.dtype, layerwise=True, construction="compact")
    compact_out = checks.run(compact, batch, encoder_decoder, device=device)
    keep = None if batch.attention_mask is None else batch.attention_mask.bool()
    rows = []
    pairs = list(zip(checks.hidden_states(explicit_out), checks.hidden_states(compact_out)))
    kind, ours = checks.final_output(explicit_out)
    pairs.append((ours, checks.final_output(compact_out)[1]))
    for i, (a, b) in enumerate(pairs):
        a, b = checks._real(a, keep).double(), checks._real(b, keep).double()
        rows.append({"index": i if i < len(pairs) - 1 else kind, "max_abs": float((a - b).abs().max()),
                     "max_rel": relative_error(a, b)})
    return rows
