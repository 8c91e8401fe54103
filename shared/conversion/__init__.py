"""Attention-only conversion: replace every FFN sublayer with attention heads that compute
the same function, and prove it layer by layer against transformers.

    report = convert(source_dir, out_dir, ConversionOptions(tolerance=1e-5))
    model = load_converted(out_dir)
    logits = model(input_ids)
"""
from .convert import check, convert
from .errors import ConversionCancelled, ConversionError
from .options import ConversionOptions
from .report import Report
from .runtime import load_converted
from .sources import SUPPORTED_ARCHITECTURES

__all__ = ["convert", "check", "load_converted", "ConversionOptions", "Report", "ConversionError",
           "ConversionCancelled", "SUPPORTED_ARCHITECTURES"]
