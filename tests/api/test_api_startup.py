"""What the API process does when it starts (api.main's lifespan): the thread pool sized by
ATTNONLY_API_THREADS (the blocking work of the submitting routes runs there), the start-up
heap frozen out of the garbage collector's full collections."""
import gc

from anyio import to_thread
from fastapi.testclient import TestClient

from api.deps import get_queue
from api.main import app
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)
from shared.settings import get_settings


def test_thread_pool_takes_its_size_from_the_settings(make_settings, keys):
    settings = make_settings(api_threads=3)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: RecordingQueue()
    try:
        with TestClient(app, headers=keys.headers("alice")) as client:
            assert client.portal.call(lambda: to_thread.current_default_thread_limiter().total_tokens) == 3
            # The submissions still go through that pool.
            assert client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/"}).status_code == 202
    finally:
        app.dependency_overrides.clear()


def test_startup_heap_is_frozen_out_of_full_collections(make_settings):
    settings = make_settings()
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: RecordingQueue()
    try:
        with TestClient(app):
            # FastAPI's, pydantic's and the app's own objects: tens of thousands, where a process
            # that froze nothing has none (a full collection walked them all: 35 ms a time).
            assert gc.get_freeze_count() > 20_000
    finally:
        app.dependency_overrides.clear()
