"""Attention-only conversion: replace every FFN of a transformers model with attention heads
that compute the same function, and prove it layer by layer against transformers.

    report = convert(source_dir, out_dir, ConversionOptions(tolerance=1e-5))
    model = load_converted(out_dir)      # the source's own transformers class, FFNs replaced
    logits = model(input_ids).logits
"""
from .convert import check, convert
from .errors import ConversionCancelled, ConversionError
from .options import ConversionOptions
from .patterns import describe_patterns
from .report import Report
from .runtime import load_converted

__all__ = ["convert", "check", "load_converted", "ConversionOptions", "Report", "ConversionError",
           "ConversionCancelled", "describe_patterns"]
