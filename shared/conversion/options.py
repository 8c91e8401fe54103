"""What a caller may ask of a conversion, and what progress it hears back."""
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Optional

from .device import check_name as check_device_name
from .errors import InvalidOptionsError

CHECK_KINDS = ("local", "propagated", "greedy")
DEFAULT_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}

# progress(stage, done, total); stages in order: loading, calibrating, writing, checking
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class ConversionOptions:
    tolerance: Optional[float] = None  # target relative error per FFN; None: 1e-5 (fp32), 1e-10 (fp64)
    dtype: Literal["float32", "float64"] = "float32"  # the compute dtype; storage follows the source
    calibration: Literal["auto", "text", "random"] = "auto"  # auto: text when the source has a tokenizer
    calibration_tokens: int = 256  # calibration tokens in all, cut into sequences of seq_len
    seq_len: int = 64
    calibration_token_ids: Optional[list[list[int]]] = None  # explicit calibration sequences
    max_shard_bytes: int = 5 * 10**9
    construction: Literal["compact", "explicit"] = "compact"  # explicit: literal Q/K/V/O heads (DESIGN.md §8)
    explicit_max_params: int = 50_000_000  # the explicit form's size guard (parameters of its head matrices)
    checks: list[str] = field(default_factory=lambda: list(CHECK_KINDS))
    greedy_tokens: int = 32
    device: Optional[str] = None  # cpu, cuda or cuda:N; None: cuda when available, else cpu (device.resolve)
    allow_pickle: bool = False  # pytorch_model.bin through torch.load(weights_only=True)
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in DEFAULT_TOLERANCE:
            raise InvalidOptionsError(f"dtype must be float32 or float64, not {self.dtype!r}")
        if self.tolerance is None:
            self.tolerance = DEFAULT_TOLERANCE[self.dtype]
        if not (0 < self.tolerance < 1):
            raise InvalidOptionsError(f"tolerance must be in (0, 1), not {self.tolerance}")
        if self.construction not in ("compact", "explicit"):
            raise InvalidOptionsError(f"construction must be compact or explicit, not {self.construction!r}")
        if self.explicit_max_params < 1:
            raise InvalidOptionsError("explicit_max_params must be positive")
        unknown = set(self.checks) - set(CHECK_KINDS)
        if unknown:
            raise InvalidOptionsError(f"unknown checks {sorted(unknown)}; choose from {list(CHECK_KINDS)}")
        if self.calibration_tokens < 1 or self.seq_len < 2:
            raise InvalidOptionsError("calibration_tokens must be >= 1 and seq_len >= 2")
        if self.calibration_token_ids is not None and not all(len(s) >= 1 for s in self.calibration_token_ids):
            raise InvalidOptionsError("calibration_token_ids must be non-empty sequences")
        if self.calibration not in ("auto", "text", "random"):
            raise InvalidOptionsError(f"calibration must be auto, text or random, not {self.calibration!r}")
        if self.max_shard_bytes < 1:
            raise InvalidOptionsError("max_shard_bytes must be positive")
        if self.greedy_tokens < 0:
            raise InvalidOptionsError("greedy_tokens must be >= 0")
        if self.device is not None:
            check_device_name(self.device)

    def to_dict(self) -> dict:
        return asdict(self)
