"""What the converter recognises: the FFN patterns of its registry and the model types seen to
convert (shared/conversion/architectures.json, made by tools/make_architectures_table.py; read
as data, so the API never imports torch)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter

from api.schemas import Architectures

router = APIRouter(tags=["architectures"])
TABLE = Path(__file__).resolve().parents[2] / "shared" / "conversion" / "architectures.json"


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text())


@router.get("/architectures", response_model=Architectures, summary="FFN patterns and model types the converter knows")
def architectures() -> Architectures:
    """Any model whose FFNs match a pattern converts, listed or not; `model_types.converted` are
    those a sweep over transformers' causal-LM types saw convert and pass their checks."""
    return Architectures(**_table())
