"""Typed conversion errors with stable codes.

The code is part of the public contract: the service copies it into a failed
job's `error.code`, so never rename one.
"""


class ConversionError(Exception):
    code = "conversion_failed"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class MissingFileError(ConversionError):
    code = "source_missing_file"


class UnsupportedArchitectureError(ConversionError):
    code = "unsupported_architecture"


class ShapeMismatchError(ConversionError):
    code = "shape_mismatch"


class CorruptWeightsError(ConversionError):
    code = "corrupt_weights"


class InvalidConfigError(ConversionError):
    code = "invalid_config"


class PickleNotAllowedError(ConversionError):
    code = "pickle_not_allowed"


class InvalidOptionsError(ConversionError):
    code = "invalid_options"


class InvalidConvertedCheckpointError(ConversionError):
    code = "invalid_converted_checkpoint"


class ConversionCancelled(ConversionError):
    code = "cancelled"


class SourceMismatchError(ConversionError):
    code = "source_mismatch"


class TooLargeForWorkerError(ConversionError):
    code = "too_large_for_worker"


class ExplicitTooLargeError(ConversionError):
    code = "explicit_too_large"
