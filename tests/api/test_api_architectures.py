"""GET /v1/architectures serves the registry table, which must be what the registry says."""
import json

from fastapi.testclient import TestClient

from api.main import app
from api.routes.architectures import TABLE
from shared.conversion.patterns import describe_patterns


def test_table_matches_the_registry():
    assert json.loads(TABLE.read_text())["patterns"] == describe_patterns()


def test_architectures_route_needs_no_key():
    answer = TestClient(app).get("/v1/architectures")
    assert answer.status_code == 200
    body = answer.json()
    assert {"kind": "gated", "act": "act_fn", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"} in body["patterns"]
    assert {"gpt2", "gemma2", "falcon"} <= set(body["model_types"]["converted"])
