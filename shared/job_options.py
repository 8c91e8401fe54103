"""The conversion options a job carries, as users write them.

The API validates requests against this model and the job record stores it; the worker
turns it into ``shared.conversion.ConversionOptions`` with ``to_conversion_kwargs``. The
bounds mirror ConversionOptions' own checks (so most mistakes are a 422 at submission,
not a failed job later) and add upper limits, so that one request cannot ask for hours
of calibration.

Strict: a field typed integer or number takes a JSON number and nothing else (no `true`
for 1, no "5" for 5), as the OpenAPI document says; an integer may be written 5.0 (JsonInt).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator

CheckKind = Literal["local", "propagated", "greedy"]
ALL_CHECKS: list[CheckKind] = ["local", "propagated", "greedy"]
MAX_CALIBRATION_TOKENS = 1_000_000


def _whole(value: Any) -> Any:
    # JSON Schema's integer is any number without a fraction, 5.0 included (schema-driven
    # clients and fuzzers send such); strict validation then still refuses 5.5, true and "5".
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_whole)]
# A bound inside a list's item type goes before the validator: after it, pydantic publishes
# it as "ge" instead of JSON Schema's "minimum".
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_whole)]


class RandomCalibration(BaseModel):
    """Random calibration tokens: ``tokens`` in all, cut into sequences of ``seq_len``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: JsonInt = Field(256, ge=1, le=MAX_CALIBRATION_TOKENS)
    seq_len: JsonInt = Field(64, ge=2, le=32_768)


class TokenIdCalibration(BaseModel):
    """Explicit calibration sequences of token ids (e.g. tokenised text from your domain)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    # Non-empty sequences of non-negative ids, as types: the OpenAPI document says so too.
    token_ids: list[Annotated[list[TokenId], Field(min_length=1)]] = Field(
        min_length=1, max_length=10_000)

    @field_validator("token_ids")
    @classmethod
    def _sane(cls, value: list[list[int]]) -> list[list[int]]:
        if sum(len(seq) for seq in value) > MAX_CALIBRATION_TOKENS:
            raise ValueError(f"at most {MAX_CALIBRATION_TOKENS} calibration tokens in all")
        return value


def _calibration_kind(value: Any) -> str:
    # Decide the branch from the keys, so that a mistake is reported once, against the
    # branch the user meant, instead of once per branch of the union.
    if isinstance(value, dict):
        return "token_id_calibration" if "token_ids" in value else "random_calibration"
    return "token_id_calibration" if isinstance(value, TokenIdCalibration) else "random_calibration"


Calibration = Annotated[
    Union[
        Annotated[RandomCalibration, Tag("random_calibration")],
        Annotated[TokenIdCalibration, Tag("token_id_calibration")],
    ],
    Discriminator(_calibration_kind),
]
# The tags appear in validation error locations; the API leaves them out of field paths.
CALIBRATION_TAGS = ("random_calibration", "token_id_calibration")


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tolerance: Optional[float] = Field(
        None, gt=0, lt=1, description="target relative error per layer; default 1e-5 (float32), 1e-10 (float64)"
    )
    dtype: Literal["float32", "float64"] = "float32"
    calibration: Calibration = Field(default_factory=RandomCalibration)
    construction: Literal["compact", "explicit"] = Field(
        "compact", description="explicit: literal Q/K/V/O heads, for small models (refused above the "
        "service's explicit_max_params)"
    )
    checks: list[CheckKind] = Field(default_factory=lambda: list(ALL_CHECKS))
    greedy_tokens: JsonInt = Field(32, ge=0, le=4096, description="length of the greedy-continuation check")
    seed: JsonInt = Field(0, ge=0, le=2**32 - 1)

    @field_validator("checks")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def to_conversion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ConversionOptions, less the worker's own (device, pickle)."""
        kwargs: dict[str, Any] = dict(
            tolerance=self.tolerance, dtype=self.dtype, construction=self.construction,
            checks=list(self.checks), greedy_tokens=self.greedy_tokens, seed=self.seed,
        )
        if isinstance(self.calibration, TokenIdCalibration):
            kwargs["calibration_token_ids"] = self.calibration.token_ids
        else:
            kwargs["calibration_tokens"] = self.calibration.tokens
            kwargs["seq_len"] = self.calibration.seq_len
        return kwargs
