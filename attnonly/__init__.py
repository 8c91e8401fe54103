"""The conversion library under the name users import in a notebook:

    import attnonly
    report = attnonly.convert("path/to/hf-model", "out/")
    model = attnonly.load_converted("out/")

The same objects as shared.conversion, the package the service imports."""
from shared.conversion import (Report, ConversionCancelled, ConversionError, ConversionOptions, check, convert,
                               describe_patterns, load_converted)
from shared.conversion.client import Client

__all__ = ["convert", "check", "load_converted", "ConversionOptions", "Report", "ConversionError",
           "ConversionCancelled", "describe_patterns", "Client"]
