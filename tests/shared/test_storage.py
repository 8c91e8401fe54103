"""S3 storage against a real S3-compatible server over HTTP (moto)."""
import hashlib
from urllib.parse import urlsplit

import httpx
import pytest

from shared.storage import Storage, StorageError, job_prefix


def test_bucket_is_created_if_missing(make_settings):
    settings = make_settings()
    storage = Storage(settings)
    assert not storage.ping()
    storage.ensure_bucket()
    storage.ensure_bucket()  # again: no error
    assert storage.ping()


def test_upload_presign_download_delete(storage, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    arts = storage.upload_job_files("job-1", folder, ["config.json", "model.safetensors"])
    assert [(a.name, a.size, a.key, a.sha256) for a in arts] == [
        ("config.json", 8, "jobs/job-1/config.json", hashlib.sha256(b'{"a": 1}').hexdigest()),
        ("model.safetensors", 1000, "jobs/job-1/model.safetensors", hashlib.sha256(b"\x00" * 1000).hexdigest()),
    ]
    url = storage.presigned_get(arts[0].key, filename="config.json")
    assert "X-Amz-Signature=" in url
    r = httpx.get(url)
    assert r.status_code == 200 and r.json() == {"a": 1}
    assert 'filename="config.json"' in r.headers.get("content-disposition", "")

    assert storage.delete_prefix(job_prefix("job-1")) == 2
    assert storage.list_keys(job_prefix("job-1")) == []
    assert httpx.get(url).status_code in (403, 404)  # S3 says 403 for a missing key to a presigned GET


def test_hashes_are_streamed_and_html_is_served_as_html(storage, tmp_path, monkeypatch):
    import shared.storage as module

    monkeypatch.setattr(module, "HASH_CHUNK_BYTES", 7)  # many chunks, a short last one
    folder = tmp_path / "out"
    folder.mkdir()
    page = b"<!DOCTYPE html><html><body>report</body></html>"
    (folder / "report.html").write_bytes(page)
    (folder / "empty.bin").write_bytes(b"")
    html, empty = storage.upload_job_files("job-2", folder, ["report.html", "empty.bin"])
    assert html.sha256 == hashlib.sha256(page).hexdigest() and html.size == len(page)
    assert empty.sha256 == hashlib.sha256(b"").hexdigest() and empty.size == 0
    # Stored as HTML; presigned without an attachment so that a browser shows it.
    r = httpx.get(storage.presigned_get(html.key))
    assert r.content == page and r.headers["content-type"].startswith("text/html")
    assert "attachment" not in r.headers.get("content-disposition", "")
    # content_type= overrides what an object was stored with (reports uploaded before).
    storage.client.put_object(Bucket=storage.bucket, Key="jobs/old/report.html", Body=page,
                              ContentType="application/octet-stream")
    r = httpx.get(storage.presigned_get("jobs/old/report.html", content_type=module.HTML_CONTENT_TYPE))
    assert r.headers["content-type"].startswith("text/html")


def test_large_files_go_up_in_parts(make_settings, tmp_path):
    mib = 1024 * 1024
    settings = make_settings(s3_multipart_threshold_bytes=5 * mib, s3_multipart_chunk_bytes=5 * mib)
    storage = Storage(settings)
    storage.ensure_bucket()
    big = tmp_path / "model.safetensors"
    data = bytes(range(256)) * (11 * mib // 256)  # 11 MiB: three parts
    big.write_bytes(data)
    storage.upload_file(big, "jobs/big/model.safetensors")
    head = storage.client.head_object(Bucket=settings.s3_bucket, Key="jobs/big/model.safetensors")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # S3 marks multipart objects "<md5>-<parts>"
    assert httpx.get(storage.presigned_get("jobs/big/model.safetensors")).content == data


def test_presigned_urls_use_the_public_endpoint(make_settings, s3_endpoint):
    port = urlsplit(s3_endpoint).port
    settings = make_settings(s3_public_endpoint_url=f"http://localhost:{port}")
    storage = Storage(settings)
    storage.ensure_bucket()
    storage.client.put_object(Bucket=settings.s3_bucket, Key="jobs/x/report.json", Body=b"{}")
    url = storage.presigned_get("jobs/x/report.json", ttl=60)
    parts = urlsplit(url)
    assert parts.netloc == f"localhost:{port}"
    assert parts.path == f"/{settings.s3_bucket}/jobs/x/report.json"  # path style: no bucket subdomain
    assert "X-Amz-Expires=60" in url
    assert httpx.get(url).content == b"{}"


def test_unreachable_endpoint_is_a_storage_error(make_settings, tmp_path):
    from deploy.local import free_port

    storage = Storage(make_settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}"), quick=True)
    assert not storage.ping()
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(StorageError) as info:
        storage.upload_file(f, "jobs/a/f")
    assert info.value.code == "storage_unavailable"
    with pytest.raises(StorageError):
        storage.ensure_bucket()


def test_copy_artifact_is_a_server_side_copy_of_its_own(make_settings, tmp_path):
    # A 5 MiB multipart threshold: the larger file goes part by part (UploadPartCopy).
    storage = Storage(make_settings(s3_multipart_threshold_bytes=5 * 2**20, s3_multipart_chunk_bytes=5 * 2**20))
    storage.ensure_bucket()
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.html").write_text("<p>ok</p>")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * (11 * 2**12))  # 11 MiB
    first = storage.upload_job_files("job-a", folder, ["report.html", "model.safetensors"])
    copies = [storage.copy_artifact(a, "job-b") for a in first]
    assert [(c.name, c.size, c.sha256, c.key) for c in copies] == [
        (a.name, a.size, a.sha256, f"jobs/job-b/{a.name}") for a in first]
    storage.delete_prefix(job_prefix("job-a"))
    for copy in copies:
        got = storage.client.get_object(Bucket=storage.bucket, Key=copy.key)
        data = got["Body"].read()
        assert len(data) == copy.size and hashlib.sha256(data).hexdigest() == copy.sha256
    assert got["ContentType"] == "application/octet-stream"
    html = storage.client.head_object(Bucket=storage.bucket, Key="jobs/job-b/report.html")
    assert html["ContentType"].startswith("text/html")  # still shown inline by the report link
    assert storage.list_keys("jobs/") == ["jobs/job-b/model.safetensors", "jobs/job-b/report.html"]
