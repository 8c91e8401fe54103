"""The device a conversion's forward passes run on (ConversionOptions.device), resolved once per
convert() or check(), before any work: None means CUDA when torch sees one, else the CPU.

Weights stay in CPU memory either way (host.offload moves each module's tensors to this device
as it runs); what is stored or compared across passes comes back to the CPU.
"""
import re

import torch

from .errors import InvalidOptionsError

# a name torch.device parses to cpu or cuda
_DEVICE_NAME = re.compile(r"^(cpu|cuda)(:\d+)?$")


def check_name(requested) -> None:
    """InvalidOptionsError unless `requested` names cpu, cuda or cuda:N: what ConversionOptions
    accepts before torch is asked, and what resolve() takes."""
    if not (isinstance(requested, str) and _DEVICE_NAME.match(requested)):
        raise InvalidOptionsError(f"device must be cpu, cuda or cuda:N, not {requested!r}")


def resolve(requested: str | None) -> torch.device:
    """The torch.device to run on; a CUDA device always with its index. Refuses one this machine
    lacks, naming what it has."""
    if requested is None:
        return _indexed(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
    check_name(requested)
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise InvalidOptionsError(
            f"device {requested!r} was asked for, but torch sees no CUDA device on this machine (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use device 'cpu' or leave it unset")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InvalidOptionsError(
            f"device {requested!r} was asked for, but this machine has {count} CUDA device(s): "
            f"cuda:0 to cuda:{count - 1}")
    return _indexed(device)


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current>: tensors report their device with its index, so comparisons hold."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
