"""Run every hostile input through the real fetch_source and print a markdown table.

    .venv/bin/python tools/hostile_inputs_table.py

Everything runs on this machine: a loopback HTTP server, a moto S3 server, and a fake
resolver for the `*.test` names (plus /etc/hosts for localhost), so nothing reaches real
DNS or the network. Every socket connect is recorded; only the two local test servers
may be reached. The URL forms, archive builders and fake DNS table are loaded from the
tests (tests/shared/), so the table shows the same inputs the test suite checks.

Exit status 1 if any input did not end with its expected error code, if a connection
was attempted anywhere else, or if a pickle payload ran.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import os
import socket
import struct
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.fetch import FetchError, FetchLimits, fetch_source  # noqa: E402
from shared.source_scopes import SourceRules, parse_scopes  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_hostile_{name}", ROOT / "tests" / "shared" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _load("test_fetch")
A = _load("test_archives")

REAL_CONNECT = socket.socket.connect
LOCAL = FetchLimits(allow_hosts=("127.0.0.1",), connect_timeout=2.0, read_timeout=2.0)


class Guard:
    """Fake DNS for *.test names; connects allowed only to the local test servers."""

    def __init__(self):
        self.net = T.Net()
        self.ports: set[int] = set()
        self.outside: list[str] = []      # refused connects to anything but the test servers
        self.case_connects: list[str] = []

    def connect(self, sock, address):
        self.case_connects.append(f"{address[0]}:{address[1]}")
        if address[0] == "127.0.0.1" and address[1] in self.ports:
            return REAL_CONNECT(sock, address)
        self.outside.append(f"{address[0]}:{address[1]}")
        raise ConnectionRefusedError(f"guard: no connection to {address[0]}")

    def install(self):
        socket.getaddrinfo = self.net.getaddrinfo
        socket.socket.connect = lambda sock, address: self.connect(sock, address)


class Table:
    def __init__(self, guard: Guard):
        self.guard, self.rows, self.problems = guard, [], []
        self.work = Path(tempfile.mkdtemp(prefix="hostile-"))

    def run(self, description: str, url: str, expected: str, limits=LOCAL, allowed_connects=None,
            check=None, verified=""):
        """Fetch `url`; record the outcome against `expected`. `allowed_connects` lists the
        only addresses this case may connect to (default: none beyond the test servers);
        `check` returns problems found after the fetch, `verified` says what it confirmed."""
        self.guard.case_connects = []
        dest = self.work / f"case{len(self.rows)}"
        try:
            fetch_source(url, dest, limits)
            outcome, code = "fetched", None
        except FetchError as exc:
            outcome, code = f"`{exc.code}` — {_short(exc.message)}", exc.code
        notes = []
        if dest.exists() and any(dest.iterdir()) and code is not None:
            notes.append("LEFT FILES IN dest_dir")
        surprise = [c for c in self.guard.case_connects
                    if not _is_test_server(c, self.guard.ports) and c not in (allowed_connects or [])]
        if surprise:
            notes.append(f"CONNECTED TO {surprise}")
        if check:
            problems = check()
            notes.extend(problems)
            if not problems and verified:
                outcome += f"; {verified}"
        ok = code == expected and not notes
        if not ok:
            self.problems.append(f"{description}: expected {expected}, got {code} {notes}")
        self.rows.append((description, outcome + ("; " + "; ".join(notes) if notes else ""), ok))

    def print(self):
        print("| # | input | what the service did (error code) |")
        print("|---|---|---|")
        for i, (description, outcome, ok) in enumerate(self.rows, 1):
            mark = "" if ok else " **UNEXPECTED**"
            print(f"| {i} | {_cell(description)} | {_cell(outcome)}{mark} |")
        print()
        refused = len(self.rows) - len(self.problems)
        print(f"{len(self.rows)} hostile inputs, {refused} ended with the expected error code. "
              f"Connection attempts to anything but the loopback test servers: "
              f"{', '.join(self.guard.outside) or 'none'} (the rebinding case must connect to its "
              "checked public address and nothing else; the sandbox guard refuses it).")


def _short(text: str, limit: int = 150) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _is_test_server(connect: str, ports: set[int]) -> bool:
    host, _, port = connect.rpartition(":")
    return host == "127.0.0.1" and int(port) in ports


# --- inputs ---------------------------------------------------------------------------

def url_forms(table: Table):
    for url, code in T.HOSTILE_URLS:
        # Default limits: no allowlist. Any connect at all would show up as a note.
        table.run(f"URL `{url}`", url, code, limits=FetchLimits())


def redirects(table: Table, server):
    locations = [
        ("http://169.254.169.254/latest/meta-data/iam/", "url_address_blocked"),
        ("http://[::ffff:169.254.169.254]/", "url_address_blocked"),
        ("http://2852039166/", "url_address_blocked"),
        ("http://meta.test/", "url_address_blocked"),
        ("http://[::1]/config.json", "url_address_blocked"),
        ("http://10.0.0.1/config.json", "url_address_blocked"),
        ("file:///etc/passwd", "url_scheme_not_allowed"),
        ("gopher://127.0.0.1:6379/_INFO", "url_scheme_not_allowed"),
        ("s3://bucket/key", "url_scheme_not_allowed"),
    ]
    for i, (location, code) in enumerate(locations):
        server.routes[f"/redir{i}/config.json"] = T.redirect(302, location)
        table.run(f"302 redirect to `{location}`", server.url(f"/redir{i}/"), code)
    server.routes["/loop/config.json"] = T.redirect(302, "/loop/config.json")
    table.run("redirect loop (302 to itself)", server.url("/loop/"), "too_many_redirects")
    for i in range(4):
        server.routes[f"/chain/{i}/config.json"] = T.redirect(307, f"/chain/{i + 1}/config.json")
    table.run("chain of 4 redirects (limit 3)", server.url("/chain/0/"), "too_many_redirects")


def rebinding(table: Table):
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])
    table.guard.net.dns["rebind.test"] = lambda: next(answers)
    table.guard.net.lookups.clear()

    def pinned():
        notes = []
        if table.guard.net.lookups != ["rebind.test"]:
            notes.append(f"RESOLVED {len(table.guard.net.lookups)} TIMES")
        if table.guard.case_connects != ["93.184.216.34:8000"]:
            notes.append(f"CONNECTED TO {table.guard.case_connects}")
        return notes
    table.run("DNS rebinding: `rebind.test` answers 93.184.216.34, then 127.0.0.1 "
              "(resolved once; connection pinned to 93.184.216.34, which the sandbox refuses)",
              "http://rebind.test:8000/model/", "source_unreachable",
              limits=FetchLimits(), allowed_connects=["93.184.216.34:8000"], check=pinned,
              verified="verified: one DNS lookup, the only connect went to 93.184.216.34")


def transport(table: Table, server):
    capped = dataclasses.replace(LOCAL, max_download_bytes=2 * 2**20)
    server.routes["/endless/m.tar.gz"] = T.endless(False, server.stop)
    table.run("endless body, no Content-Length (cap 2 MiB)", server.url("/endless/m.tar.gz"),
              "download_too_large", capped)
    server.routes["/chunked/m.tar.gz"] = T.endless(True, server.stop)
    table.run("endless chunked body (cap 2 MiB)", server.url("/chunked/m.tar.gz"), "download_too_large", capped)
    server.routes["/huge/m.tar"] = lambda h: T.send(h, 200, b"", {"Content-Length": str(50 * 2**30)})
    table.run("Content-Length: 50 GiB (cap 2 MiB)", server.url("/huge/m.tar"), "download_too_large", capped)
    server.add_dir("/sum", {"config.json": A.CONFIG, "model.safetensors": A.safetensors_bytes(2**19)})
    table.run("two files each under the cap, together over it (cap 2 MiB)", server.url("/sum/"),
              "download_too_large", capped)
    weights = A.safetensors_bytes(64)
    server.add_dir("/liar", {"config.json": A.CONFIG})
    server.routes["/liar/model.safetensors"] = lambda h: T.send(h, 200, weights, {"Content-Length": "40"})
    table.run("Content-Length understates the body (40 of 320 bytes)", server.url("/liar/"), "safetensors_invalid")
    slow = dataclasses.replace(LOCAL, read_timeout=0.3)
    server.routes["/slow0/config.json"] = T.stall(5, server.stop, after_headers=False)
    table.run("server never answers (read timeout 0.3 s)", server.url("/slow0/"), "download_timeout", slow)
    server.routes["/slow1/config.json"] = T.stall(5, server.stop, after_headers=True)
    table.run("server stalls mid-body (read timeout 0.3 s)", server.url("/slow1/"), "download_timeout", slow)
    server.routes["/gz/config.json"] = T.serve_bytes(b"\x1f\x8b", **{"Content-Encoding": "gzip"})
    table.run("Content-Encoding: gzip on a file", server.url("/gz/"), "source_http_error")
    server.routes["/down/config.json"] = lambda h: T.send(h, 503, b"")
    table.run("HTTP 503", server.url("/down/"), "source_http_error")
    table.run("HTTP 404 for the archive", server.url("/nothing.tar.gz"), "source_not_found")


def hf_directories(table: Table, server, marker: Path):
    for shard in ["../../etc/passwd.safetensors", "sub/x.safetensors", ".hidden.safetensors", "x.bin"]:
        index = json.dumps({"weight_map": {"w": shard}}).encode()
        prefix = f"/idx{abs(hash(shard))}"
        server.add_dir(prefix, {"config.json": A.CONFIG, "model.safetensors.index.json": index})
        table.run(f"index names shard `{shard}`", server.url(prefix + "/"), "safetensors_invalid")
    server.add_dir("/pickle", {"config.json": A.CONFIG, "pytorch_model.bin": T.pickle_with_payload(marker)})
    table.run("only pytorch_model.bin, a pickle whose payload runs `touch marker`",
              server.url("/pickle/"), "pickle_not_allowed", check=lambda: _payload_ran(marker),
              verified="verified: marker file not created")
    server.add_dir("/cfg1", {"config.json": b"[1, 2]"})
    table.run("config.json is a JSON list", server.url("/cfg1/"), "config_invalid")
    server.add_dir("/cfg2", {"config.json": b'{"pad": "' + b"x" * (9 * 2**20) + b'"}'})
    table.run("config.json of 9 MiB", server.url("/cfg2/"), "config_invalid")


def _payload_ran(marker: Path) -> list[str]:
    return ["PICKLE PAYLOAD RAN"] if marker.exists() else []


def archives(table: Table, server, root: Path, marker: Path):
    def publish(name, members, **kwargs):
        A.write_tar(root / name, members, **kwargs)
        return server.url(f"/files/{name}")

    valid = lambda: A.files(A.MODEL)  # noqa: E731
    for case, build in A.UNSAFE.items():
        info, _ = build()
        what = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char device",
                tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}.get(info.type, "file")
        link = f" → `{info.linkname}`" if info.linkname else ""
        table.run(f"tar.gz member `{info.name}` ({what}{link})",
                  publish(f"{case}.tar.gz", valid() + [build()]), "archive_unsafe_member")
    table.run("tar.gz sparse member", publish("sparse.tar.gz", valid() + [A.member("model/s", kind=tarfile.GNUTYPE_SPARSE)],
                                               fmt=tarfile.GNU_FORMAT), "archive_unsafe_member")
    small = dataclasses.replace(LOCAL, max_unpacked_bytes=8 * 2**20)
    url = publish("bomb.tar.gz", valid() + [A.member("model/zeros", size=64 * 2**20)])
    size = (root / "bomb.tar.gz").stat().st_size
    table.run(f"gzip bomb: 64 MiB of zeros in a {size // 1024} KiB .tar.gz (max_unpacked 8 MiB)", url,
              "archive_too_large", small)
    url = publish("sum.tar.gz", valid() + [A.member(f"model/p{i}", size=3 * 2**20) for i in range(3)])
    table.run("three 3 MiB members (max_unpacked 8 MiB)", url, "archive_too_large", small)
    url = publish("many.tar.gz", valid() + [A.member(f"model/f{i}", b"") for i in range(200)])
    table.run("202 members (max_archive_files 50)", url, "archive_too_large",
              dataclasses.replace(LOCAL, max_archive_files=50))
    info, stream = A.member("model/config.json", A.CONFIG)
    info.pax_headers = {"comment": "x" * (4 * 2**20)}
    table.run("pax header of 4 MiB (memory bomb for tarfile)", publish("pax.tar.gz", [(info, stream)]),
              "archive_too_large")
    table.run("GNU long name of 2 MiB", publish("longname.tar.gz", [A.member("model/" + "n" * 2**21, b"x")],
                                                 fmt=tarfile.GNU_FORMAT), "archive_too_large")
    for case, body in [("random bytes", os.urandom(4096)),
                       ("truncated gzip", A._valid_tar_gz()[:-40]),
                       ("gzip of a non-tar", gzip.compress(b"not a tar" * 200)),
                       ("empty file", b"")]:
        name = case.replace(" ", "-") + ".tar.gz"
        (root / name).write_bytes(body)
        table.run(f"corrupt archive: {case}", server.url(f"/files/{name}"), "archive_invalid")
    url = publish("pickle.tar.gz", A.files({"config.json": A.CONFIG,
                                            "pytorch_model.bin": T.pickle_with_payload(marker)}))
    table.run("tar.gz holding pytorch_model.bin with an os.system payload", url, "pickle_not_allowed",
              check=lambda: _payload_ran(marker), verified="verified: marker file not created")
    bad = A.safetensors_bytes(header_override={"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}})
    url = publish("badweights.tar.gz", A.files({"config.json": A.CONFIG, "model.safetensors": bad}))
    table.run("tar.gz with a safetensors file whose offsets point past its end", url, "safetensors_invalid")


def _st(header, data=b"", header_len=None, raw=None) -> bytes:
    raw = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def safetensors(table: Table, server):
    t = lambda dtype, shape, b, e: {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}  # noqa: E731
    cases = [
        ("truncated file (data cut short)", _st({"a": t("F32", [4], 0, 16)}, b"\0" * 11)),
        ("header length larger than the file", _st({}, header_len=10_000)),
        ("header length 2^63", _st({}, header_len=2**63)),
        ("file of 3 bytes", b"\x10\0\0"),
        ("data_offsets beyond the data section", _st({"a": t("F32", [1024], 0, 4096)}, b"\0" * 16)),
        ("overlapping data_offsets", _st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, b"\0" * 12)),
        ("two tensors aliasing the same bytes", _st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 0, 8)}, b"\0" * 8)),
        ("hole between tensors", _st({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, b"\0" * 12)),
        ("trailing bytes after the last tensor (polyglot)", _st({"a": t("F32", [1], 0, 4)}, b"\0" * 4 + b"<html>")),
        ("span inconsistent with dtype × shape", _st({"a": t("F32", [3], 0, 8)}, b"\0" * 8)),
        ("dtype `F4`", _st({"a": t("F4", [1], 0, 4)}, b"\0" * 4)),
        ("dtype `OBJECT`", _st({"a": t("OBJECT", [1], 0, 4)}, b"\0" * 4)),
        ("negative dimension", _st({"a": t("U8", [-1], 0, 1)}, b"\0")),
        ("boolean dimension `true`", _st({"a": t("U8", [True], 0, 1)}, b"\0")),
        ("11 tensors with max_tensors 10", _st({f"t{i}": t("U8", [1], i, i + 1) for i in range(11)}, b"\0" * 11)),
        ("header is not JSON", _st(None, raw=b"not json")),
        ("header is a JSON list", _st(None, raw=b"[1, 2]")),
        ("duplicate tensor names", _st(None, raw=b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, '
                                               b'"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}')),
        ("header nested 100 000 deep", _st(None, raw=b"[" * 100_000)),
    ]
    few = dataclasses.replace(LOCAL, max_tensors=10)
    for i, (description, body) in enumerate(cases):
        server.add_dir(f"/st{i}", {"config.json": A.CONFIG, "model.safetensors": body})
        table.run(f"model.safetensors: {description}", server.url(f"/st{i}/"), "safetensors_invalid", few)


def s3_sources(table: Table, moto_endpoint: str):
    import boto3

    # The job's owner ("alice") may read the "models" and "no-such-bucket" buckets and
    # bob's-models/shared; "artifacts" is the service's own bucket (other owners' results).
    rules = SourceRules(owner="alice", artifacts_bucket="artifacts", scopes=tuple(parse_scopes(
        "alice=models, alice=no-such-bucket, *=artifacts, bob=bobs-models, alice=bobs-models/shared")))
    limits = FetchLimits(s3_endpoint_url=moto_endpoint, s3_access_key="test", s3_secret_key="test",
                         connect_timeout=2, read_timeout=5, s3_source_rules=rules)
    client = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket="models")
    client.create_bucket(Bucket="artifacts")
    client.create_bucket(Bucket="bobs-models")
    for bucket, prefix in (("artifacts", "jobs/job-of-bob"), ("bobs-models", "private"),
                           ("bobs-models", "shared-not")):
        client.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=A.CONFIG)
        client.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=A.safetensors_bytes(16))
    with tempfile.TemporaryDirectory() as tmp:
        A.write_tar(Path(tmp) / "a.tar.gz", A.files(A.MODEL) + [A.UNSAFE["dotdot"]()])
        client.put_object(Bucket="models", Key="evil.tar.gz", Body=(Path(tmp) / "a.tar.gz").read_bytes())
    client.put_object(Bucket="models", Key="big/config.json", Body=A.CONFIG)
    client.put_object(Bucket="models", Key="big/model.safetensors", Body=A.safetensors_bytes(2**18))
    table.run("`s3://models/missing/` (no such prefix)", "s3://models/missing/", "source_not_found", limits)
    table.run("`s3://no-such-bucket/x.tar.gz`", "s3://no-such-bucket/x.tar.gz", "source_not_found", limits)
    table.run("`s3://models/evil.tar.gz` with a `../` member", "s3://models/evil.tar.gz", "archive_unsafe_member", limits)
    table.run("`s3://models/big/` over the cap (1 MiB)", "s3://models/big/", "download_too_large",
              dataclasses.replace(limits, max_download_bytes=2**20))
    forbidden = [
        ("`s3://artifacts/jobs/job-of-bob/`: another owner's converted model (artifacts bucket, "
         "although a `*` scope names it)", "s3://artifacts/jobs/job-of-bob/"),
        ("`s3://bobs-models/private/`: another owner's scope", "s3://bobs-models/private/"),
        ("`s3://bobs-models/shared-not/` with scope `bobs-models/shared` (whole segments only)",
         "s3://bobs-models/shared-not/"),
        ("`s3://bobs-models/shared/../private/` (climbing out of the scope)", "s3://bobs-models/shared/../private/"),
        ("`s3://bobs-models/shared/%2e%2e/private/` (the same, percent-encoded)",
         "s3://bobs-models/shared/%2e%2e/private/"),
    ]
    for description, url in forbidden:
        table.run(description, url, "source_forbidden", limits)
    table.run("`s3://models/big/` with no S3 source scopes at all", "s3://models/big/", "source_forbidden",
              dataclasses.replace(limits, s3_source_rules=None))


def main() -> int:
    guard = Guard()
    server = T.Server()
    files_root = Path(tempfile.mkdtemp(prefix="hostile-files-"))
    _serve_directory(server, files_root)
    from moto.server import ThreadedMotoServer
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    moto_port = moto.get_host_and_port()[1]
    guard.ports |= {server.port, moto_port}
    guard.install()
    table = Table(guard)
    marker = table.work / "payload-ran"
    try:
        url_forms(table)
        redirects(table, server)
        rebinding(table)
        transport(table, server)
        hf_directories(table, server, marker)
        archives(table, server, files_root, marker)
        safetensors(table, server)
        s3_sources(table, f"http://127.0.0.1:{moto_port}")
    finally:
        server.close()
        moto.stop()
    table.print()
    for problem in table.problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if table.problems else 0


def _serve_directory(server, root: Path):
    """Serve /files/<name> from `root`, read at request time (archives are written later)."""

    class Routes(dict):
        def get(self, path, default=None):
            target = root / path[len("/files/"):]
            if path.startswith("/files/") and target.parent == root and target.is_file():
                return T.serve_bytes(target.read_bytes())
            return dict.get(self, path, default)
    server.httpd.routes = Routes(server.httpd.routes)


if __name__ == "__main__":
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    sys.exit(main())
