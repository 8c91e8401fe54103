"""api.schemas.Links makes the links of a job without request.url_for (which walks every
route on every call): its URLs must be url_for's, whatever the request's scheme, host and
root path."""
import pytest
from starlette.requests import Request

from api.main import app
from api.schemas import Links


def request(scheme="http", host: bytes | None = b"testserver", server=("127.0.0.1", 8000), root_path=""):
    headers = [(b"host", host)] if host is not None else []
    return Request({"type": "http", "method": "GET", "scheme": scheme, "server": server, "root_path": root_path,
                    "path": root_path + "/v1/jobs/x", "query_string": b"", "headers": headers, "app": app})


@pytest.mark.parametrize("req", [
    request(),
    request(scheme="https", host=b"api.example.org"),
    request(host=b"127.0.0.1:8080", root_path="/attnonly"),
    request(host=b"[::1]:9000", root_path="/a/b/"),
    request(host=None, server=("10.0.0.5", 8443), scheme="https"),
])
@pytest.mark.parametrize("route, params", [
    ("get_job", {"job_id": "0b4c2a1e-5f7d-4c39-9d2e-8f1a6b3c7d90"}),
    ("cancel_job", {"job_id": "0b4c2a1e-5f7d-4c39-9d2e-8f1a6b3c7d90"}),
    ("get_artifact", {"job_id": "0b4c2a1e-5f7d-4c39-9d2e-8f1a6b3c7d90", "name": "model.safetensors"}),
])
def test_links_are_url_for(req, route, params):
    assert Links(req).url(route, **params) == str(req.url_for(route, **params))


def test_job_links_name_the_job_routes():
    links = Links(request(root_path="/attnonly")).job("j1")
    assert (links.self, links.cancel) == ("http://testserver/attnonly/v1/jobs/j1",
                                          "http://testserver/attnonly/v1/jobs/j1/cancel")
