"""The API's side of reuse: ``force`` is taken and stored, ``reused_from`` is shown."""
import pytest
from fastapi.testclient import TestClient

from api.deps import get_queue
from api.main import app
from shared.jobs import Artifact, JobState
from shared.settings import get_settings
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)


@pytest.fixture
def client(settings, storage, keys):
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: RecordingQueue()
    with TestClient(app, raise_server_exceptions=False, headers=keys.headers("alice")) as c:
        yield c
    app.dependency_overrides.clear()


def test_force_is_stored_and_reused_from_is_shown(client, store):
    plain = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/"}).json()["id"]
    forced = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/", "force": True}).json()["id"]
    assert store.get(plain).force is False and store.get(forced).force is True
    assert client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/", "force": "maybe"}).status_code == 422

    store.claim(plain)
    store.finish(plain, JobState.succeeded, reused_from=forced,
                 artifacts=[Artifact(name="config.json", size=2, key=f"jobs/{plain}/config.json", sha256="0" * 64)])
    shown = client.get(f"/v1/jobs/{plain}").json()
    assert shown["reused_from"] == forced and shown["force"] is False
    assert client.get(f"/v1/jobs/{forced}").json()["reused_from"] is None
    listed = {j["id"]: j for j in client.get("/v1/jobs").json()["jobs"]}
    assert listed[plain]["reused_from"] == forced and listed[forced]["force"] is True
