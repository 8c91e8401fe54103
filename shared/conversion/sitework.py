"""One FFN site, evaluated three ways on the inputs it saw in a reference forward pass:

    reference    the source module's own forward in float64 (its weights loaded for the call)
    rebuilt      the pattern's reconstruction in float64 (verifies the match before converting)
    converted    the head modules in the compute dtype (measures the construction's error)

Every site's output is compared at the FFN's output (after its down projection). Inputs are
what the hooks caught: Plain sites the activation's input u, Gated sites the module's input
x, Experts sites (x, routing indices, routing weights). They are on the device the pass runs on,
and so is every module evaluated here (its weights copied there from CPU memory); the result of
each evaluation stays there for relative_error.
"""
import copy

import torch
import torch.nn as nn
from accelerate.utils import set_module_tensor_to_device

from .activations import exact_activation
from .modules import GatedHeads, HeadExperts, NeuronHeads, ProductHeads, expert_projection
from .patterns import Experts, Gated, Plain, Site


def load_submodule(probe: nn.Module, weights, path: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A real copy of probe's module at `path` on `device`, its tensors from `weights` cast to dtype."""
    module = copy.deepcopy(probe.get_submodule(path))
    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, device, value=weights[f"{path}.{name}"], dtype=dtype)
    for name, _ in list(module.named_buffers()):  # the probe's buffers are real, on the CPU
        set_module_tensor_to_device(module, name, device)
    return module.eval()


class SiteWork:
    def __init__(self, site: Site, probe: nn.Module, weights, device: torch.device):
        self.site, self.probe, self.weights, self.device = site, probe, weights, device
        self._loaded: dict = {}  # (relative path, dtype) -> module: each read once per site

    def _module(self, relative: str | None, dtype):
        key = (relative, dtype)
        if key not in self._loaded:
            path = self.site.join(relative) if relative else self.site.path
            self._loaded[key] = load_submodule(self.probe, self.weights, path, dtype, self.device)
        return self._loaded[key]

    @torch.no_grad()
    def reference(self, inputs) -> torch.Tensor:
        p = self.site.pattern
        if isinstance(p, Plain):
            act = self.probe.get_submodule(self.site.join(p.act))
            return self._module(p.down, torch.float64)(act(inputs[0].double()))
        module = self._module(None, torch.float64)
        if isinstance(p, Gated):
            args, kwargs = (_double(inputs[1]), _double(inputs[2])) if len(inputs) > 1 else ((), {})
            out = module(inputs[0].double(), *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out
        return module(inputs[0].double(), inputs[1], inputs[2].double())

    @torch.no_grad()
    def rebuilt(self, inputs) -> torch.Tensor:
        """The pattern's formula with the exact activation, float64."""
        p, phi = self.site.pattern, (lambda t: exact_activation(self.site.activation, t))
        if isinstance(p, Plain):
            return self._module(p.down, torch.float64)(phi(inputs[0].double()))
        module = self._module(None, torch.float64)
        x = inputs[0].double()
        if isinstance(p, Gated):
            if p.fused:
                gate, up = module.get_submodule(p.fused)(x).chunk(2, dim=-1)
            else:
                gate, up = module.get_submodule(p.gate)(x), module.get_submodule(p.up)(x)
            return module.get_submodule(p.down)(phi(gate) * up) if p.down else phi(gate) * up
        gate_up, down = getattr(module, p.gate_up), getattr(module, p.down)
        out = torch.zeros_like(x)
        index, weight = inputs[1], inputs[2].double()
        for e in index.unique().tolist():
            if 0 <= e < gate_up.shape[0]:
                token, slot = torch.where(index == e)
                gate, up = expert_projection(x[token], gate_up[e], p.transposed).chunk(2, dim=-1)
                y = expert_projection(phi(gate) * up, down[e], p.transposed) * weight[token, slot, None]
                out.index_add_(0, token, y)
        return out

    def converted_module(self, plan: dict, tensors: dict, dtype: torch.dtype) -> nn.Module:
        """The site's head modules (no decoding context), with the source weights, in dtype."""
        p = self.site.pattern
        if isinstance(p, Plain):
            from .host import plain_heads

            heads = plain_heads(self.site, plan, None)
            _load(heads, tensors, dtype, self.device)
            return _PlainSite(heads, self._module(p.down, dtype))
        if isinstance(p, Gated):
            module = self._module(None, dtype)
            names = [n for n in (p.gate, p.up, p.down, p.fused) if n]
            gate = NeuronHeads(plan["heads_per_unit"], self.site.units, plan["omega"], self.site.causal, None)
            product = ProductHeads(self.site.units, plan["product_omega"], self.site.causal, None)
            gated = GatedHeads({n: module.get_submodule(n) for n in names}, p.gate, p.up, p.down, p.fused, gate, product)
            _load(gated, tensors, dtype, self.device, only=("gate_heads.", "product."))
            return gated
        gate_up = self.weights[self.site.join(p.gate_up)]
        E, F, D = p.shapes(gate_up, self.weights[self.site.join(p.down)])
        experts = HeadExperts(E, F, D, plan["heads_per_unit"], p.transposed)
        _load(experts, {**tensors, "gate_up_proj": gate_up, "down_proj": self.weights[self.site.join(p.down)]}, dtype,
              self.device)
        return experts

    @torch.no_grad()
    def converted(self, module: nn.Module, inputs, dtype) -> torch.Tensor:
        if isinstance(self.site.pattern, Experts):
            return module(inputs[0].to(dtype), inputs[1], inputs[2].to(dtype))
        return module(inputs[0].to(dtype))


class _PlainSite(nn.Module):
    def __init__(self, heads, down):
        super().__init__()
        self.heads, self.down = heads, down

    def forward(self, u):
        return self.down(self.heads(u))


def _double(value):
    """value with its floating tensors (in tuples, lists, dicts too) in float64."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_double(v) for v in value)
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value


def _load(module: nn.Module, tensors: dict, dtype, device: torch.device, only=None):
    """The head tensors (planned on the CPU) into module's parameters on `device`."""
    for name, _ in list(module.named_parameters()):
        if only is None or name.startswith(only):
            set_module_tensor_to_device(module, name, device, value=tensors[name], dtype=dtype)
