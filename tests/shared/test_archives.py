"""Archive sources (.tar, .tar.gz, .tgz) fetched over loopback HTTP and unpacked safely.

Each hostile archive is built here with tarfile, served by a real HTTP server and
fetched with fetch_source; the tests check the error code, that dest_dir is left empty
and that nothing was written outside it.
"""
import functools
import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.fetch import FetchError, FetchLimits, fetch_source
from shared.safefiles import extract_archive

LOCAL = FetchLimits(allow_hosts=("127.0.0.1",), connect_timeout=2.0, read_timeout=5.0)
CONFIG = json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 1}).encode()


def safetensors_bytes(n_floats=4, header_override=None):
    header = header_override or {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * n_floats)


MODEL = {"config.json": CONFIG, "model.safetensors": safetensors_bytes()}


# --- building archives ----------------------------------------------------------------

class Zeros(io.RawIOBase):
    """`size` zero bytes without holding them in memory."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def member(name, body=b"", kind=tarfile.REGTYPE, linkname="", size=None, **attrs):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(body) if size is None else size
    for key, value in attrs.items():
        setattr(info, key, value)
    stream = io.BytesIO(body) if size is None else Zeros(size)
    return info, (stream if info.isreg() else None)


def files(mapping, top="model"):
    return [member(f"{top}/{name}" if top else name, body) for name, body in mapping.items()]


def write_tar(path, members, compress=True, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w:gz" if compress else "w", format=fmt) as tar:
        for info, stream in members:
            tar.addfile(info, stream)
    return path


class ArchiveServer:
    def __init__(self, root):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.root = root
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def publish(self, name, members, **kwargs):
        write_tar(self.root / name, members, **kwargs)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ArchiveServer(tmp_path_factory.mktemp("served"))
    yield s
    s.close()


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "work" / "dest"


def refused(url, dest, limits=LOCAL) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch_source(url, dest, limits)
    assert list(dest.iterdir()) == [], "a refused archive must leave dest_dir empty"
    return info.value


def written_outside(tmp_path, dest):
    return [p for p in tmp_path.rglob("*") if dest not in p.parents and p != dest and p.is_file()]


# --- well-formed archives -------------------------------------------------------------

@pytest.mark.parametrize("name, compress, top", [
    ("nested.tar.gz", True, "model"), ("flat.tgz", True, ""), ("plain.tar", False, "gpt2-tiny"),
])
def test_good_archive_is_unpacked_into_dest(server, dest, name, compress, top):
    url = server.publish(name, files(MODEL, top), compress=compress)
    fetch_source(url, dest, LOCAL)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == MODEL["model.safetensors"]


def test_archive_type_is_sniffed_not_taken_from_the_name(server, dest):
    # A gzip stream named .tar still unpacks; the suffix only selects archive handling.
    url = server.publish("actually-gzip.tar", files(MODEL), compress=True)
    fetch_source(url, dest, LOCAL)
    assert (dest / "config.json").read_bytes() == CONFIG


# --- unsafe members -------------------------------------------------------------------

UNSAFE = {
    "dotdot": functools.partial(member, "../evil.txt", b"x"),
    "dotdot-nested": functools.partial(member, "model/../../evil.txt", b"x"),
    "absolute": functools.partial(member, "/tmp/evil.txt", b"x"),
    "backslash": functools.partial(member, "..\\evil.txt", b"x"),
    "symlink-abs": functools.partial(member, "model/model.safetensors", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
    "symlink-rel": functools.partial(member, "model/up", kind=tarfile.SYMTYPE, linkname="../../.."),
    "hardlink": functools.partial(member, "model/hard", kind=tarfile.LNKTYPE, linkname="/etc/passwd"),
    "char-device": functools.partial(member, "model/null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3),
    "block-device": functools.partial(member, "model/sda", kind=tarfile.BLKTYPE, devmajor=8, devminor=0),
    "fifo": functools.partial(member, "model/pipe", kind=tarfile.FIFOTYPE),
    "duplicate": functools.partial(member, "model/config.json", b'{"replaced": true}'),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_member_is_refused(server, dest, tmp_path, case):
    # The hostile member follows a valid model, so the refusal cannot come from a missing file.
    url = server.publish(f"unsafe-{case}.tar.gz", files(MODEL) + [UNSAFE[case]()])
    error = refused(url, dest)
    assert error.code == "archive_unsafe_member", str(error)
    assert written_outside(tmp_path, dest) == []


def test_traversal_never_writes_outside_even_when_called_directly(tmp_path):
    archive = write_tar(tmp_path / "a.tar.gz", [member("ok/config.json", CONFIG), member("../../escaped", b"x")])
    target = tmp_path / "deep" / "er"
    target.mkdir(parents=True)
    with pytest.raises(FetchError) as info:
        extract_archive(archive, target, LOCAL)
    assert info.value.code == "archive_unsafe_member"
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()


def test_sparse_member_is_refused(server, dest):
    url = server.publish("sparse.tar.gz", files(MODEL) + [member("model/sparse", kind=tarfile.GNUTYPE_SPARSE)],
                         fmt=tarfile.GNU_FORMAT)
    assert refused(url, dest).code == "archive_unsafe_member"


# --- bombs and limits -----------------------------------------------------------------

def test_gzip_bomb_is_stopped(server, dest):
    url = server.publish("bomb.tar.gz", files(MODEL) + [member("model/zeros.bin2", size=64 * 2**20)])
    assert (server.root / "bomb.tar.gz").stat().st_size < 200_000  # tiny on the wire
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_unpacked_bytes=8 * 2**20)
    error = refused(url, dest, limits)
    assert error.code == "archive_too_large" and str(8 * 2**20) in error.message


def test_unpacked_total_counts_every_member(server, dest):
    # Each member fits the limit on its own; together they do not.
    parts = [member(f"model/part{i}", size=3 * 2**20) for i in range(3)]
    url = server.publish("sum.tar.gz", files(MODEL) + parts)
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_unpacked_bytes=8 * 2**20)
    assert refused(url, dest, limits).code == "archive_too_large"


def test_too_many_files(server, dest):
    url = server.publish("many.tar.gz", files(MODEL) + [member(f"model/f{i}", b"") for i in range(200)])
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_archive_files=50)
    error = refused(url, dest, limits)
    assert error.code == "archive_too_large" and "50" in error.message


def test_pax_header_bomb_is_refused_before_tarfile_buffers_it(server, dest):
    info, stream = member("model/config.json", CONFIG)
    info.pax_headers = {"comment": "x" * (4 * 2**20)}
    url = server.publish("pax-bomb.tar.gz", [(info, stream)])
    error = refused(url, dest)
    assert error.code == "archive_too_large" and "metadata" in error.message


def test_bytes_outside_file_contents_count_too(server, dest):
    # Many pax headers, each under the metadata cap and none with file data: the
    # decompressed stream as a whole is still capped.
    members = []
    for i in range(24):
        info, _ = member(f"model/d{i}", kind=tarfile.DIRTYPE)
        info.pax_headers = {"comment": "x" * (900 * 2**10)}
        members.append((info, None))
    url = server.publish("pax-padding.tar.gz", files(MODEL) + members)
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_unpacked_bytes=2**20, max_archive_files=100)
    error = refused(url, dest, limits)
    assert error.code == "archive_too_large" and "decompresses to more than" in error.message


def test_gnu_long_name_bomb_is_refused(server, dest):
    url = server.publish("longname.tar.gz", [member("model/" + "n" * (2 * 2**20), b"x")], fmt=tarfile.GNU_FORMAT)
    assert refused(url, dest).code == "archive_too_large"


def test_archive_over_the_download_cap(server, dest):
    url = server.publish("big-download.tar", files(MODEL) + [member("model/blob", size=2 * 2**20)], compress=False)
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_download_bytes=2**20)
    assert refused(url, dest, limits).code == "download_too_large"


# --- corrupt archives -----------------------------------------------------------------

def _valid_tar_gz():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, stream in files(MODEL):
            tar.addfile(info, stream)
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["random", "truncated-gzip", "gzip-of-not-tar", "empty"])
def test_corrupt_archive(server, dest, case):
    body = {
        "random": os.urandom(4096),
        "truncated-gzip": _valid_tar_gz()[:-40],
        "gzip-of-not-tar": gzip.compress(b"this is not a tar archive" * 100),
        "empty": b"",
    }[case]
    (server.root / f"corrupt-{case}.tar.gz").write_bytes(body)
    url = f"http://127.0.0.1:{server.httpd.server_address[1]}/corrupt-{case}.tar.gz"
    error = refused(url, dest)
    assert error.code == "archive_invalid", str(error)


# --- contents of the archive ----------------------------------------------------------

def test_pickle_in_archive_is_refused_and_payload_never_runs(server, dest, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    body = pickle.dumps({"w": Payload()})
    url = server.publish("pickle.tar.gz", files({"config.json": CONFIG, "pytorch_model.bin": body}))
    error = refused(url, dest)
    assert error.code == "pickle_not_allowed"
    assert not marker.exists()

    allowed = FetchLimits(allow_hosts=("127.0.0.1",), allow_pickle=True)
    fetch_source(url, dest, allowed)
    assert (dest / "pytorch_model.bin").read_bytes() == body
    assert not marker.exists()  # fetching never unpickles


def test_archive_with_corrupt_safetensors(server, dest):
    bad = safetensors_bytes(header_override={"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}})
    url = server.publish("bad-weights.tar.gz", files({"config.json": CONFIG, "model.safetensors": bad}))
    error = refused(url, dest)
    assert error.code == "safetensors_invalid" and "outside" in error.message


@pytest.mark.parametrize("contents, code", [
    ({"model.safetensors": safetensors_bytes()}, "source_missing_file"),
    ({"config.json": CONFIG}, "source_missing_file"),
    ({"config.json": b"[]", "model.safetensors": safetensors_bytes()}, "config_invalid"),
    ({"config.json": CONFIG, "model.safetensors.index.json": b'{"weight_map": {"w": "../x.safetensors"}}'},
     "safetensors_invalid"),
], ids=["no-config", "no-weights", "config-not-object", "index-traversal"])
def test_archive_contents_are_validated(server, dest, contents, code):
    url = server.publish(f"contents-{sorted(contents)}-{code}.tar.gz".replace(" ", ""), files(contents))
    assert refused(url, dest).code == code
