"""Run the whole service on one machine without Docker, then convert a demo checkpoint.

    python -m deploy.local                   # keeps running; Ctrl-C stops everything
    python -m deploy.local --exit-after-demo # stops after the demo (exit status 0 on success)

What it starts, each only where needed:

* Redis: the configured ATTNONLY_REDIS_URL if something answers there, else a
  ``redis-server`` on that (loopback) port.
* S3: the configured ATTNONLY_S3_ENDPOINT_URL, else an embedded S3-compatible server
  (moto) on a free loopback port.
* one Celery worker and the API (uvicorn with --api-workers processes, 2 by default,
  http://127.0.0.1:8000), as child processes with their logs under .local/logs/.

Then it saves a tiny GPT-2 with random weights, serves it over a local HTTP server,
submits it, follows the job to its end and prints where the artifacts are. Loopback
sources are allowed for this local service only (ATTNONLY_FETCH_ALLOW_HOSTS).

The API wants an API key. The runner makes one for its session (owner "local"), adds it
to any keys in ATTNONLY_API_KEYS, prints it and saves it in <log dir>/api-key (mode 0600)
for curl: ``-H "Authorization: Bearer $(cat .local/logs/api-key)"``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / ".local" / "logs"
LOOPBACK = ("127.0.0.1", "localhost")
# Short calibration: the demo should take seconds on a laptop CPU.
DEMO_OPTIONS = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 8}
FINISHED = ("succeeded", "failed", "cancelled")


class LocalError(RuntimeError):
    """Something the local runner cannot do; the message says what to do about it."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group we started (Celery's pool children included), then
    SIGKILL what is left after ``timeout``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_process(name: str, argv: list[str], env: dict, stack: ExitStack, log_dir: Path = LOG_DIR,
                  stop_timeout: float = 15) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "wb")
    stack.callback(log.close)
    # A session of its own, so that stopping it reaches its children and nothing else.
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop_process, proc, stop_timeout)
    return proc


def start_redis_server(port: int, stack: ExitStack, log_dir: Path = LOG_DIR) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        raise LocalError("no Redis answers and redis-server is not installed (Debian: apt-get install redis-server)")
    proc = start_process(
        "redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        dict(os.environ), stack, log_dir,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LocalError(f"redis-server did not start on port {port}; see {log_dir / 'redis.log'}")
        time.sleep(0.1)


class RedisServer:
    """A redis-server on a fixed loopback port that can be stopped and started again on
    the same port (the fault tests restart it). With ``data_dir`` it keeps its data in an
    append-only file there, as compose's Redis does, so a restart loses nothing."""

    def __init__(self, port: int, stack: ExitStack, log_dir: Path, data_dir: Optional[Path] = None):
        self.port, self.stack, self.log_dir, self.data_dir = port, stack, log_dir, data_dir
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise LocalError("redis-server is not installed (Debian: apt-get install redis-server)")
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        else:
            argv += ["--appendonly", "no"]
        self.starts += 1
        self.proc = start_process(f"redis-{self.port}-{self.starts}", argv, dict(os.environ), self.stack,
                                  self.log_dir)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LocalError(f"redis-server did not start on port {self.port}; see {self.log_dir}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file and exits), and wait for the port."""
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None


def ensure_redis(url: str, stack: ExitStack, log_dir: Path = LOG_DIR) -> bool:
    """Start a redis-server for ``url`` unless one answers. Returns True if it started one."""
    if redis_answers(url):
        return False
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise LocalError(f"Redis at {url} does not answer (a non-local Redis is not started here)")
    start_redis_server(parts.port or 6379, stack, log_dir)
    return True


def start_s3_server(stack: ExitStack, host: str = "127.0.0.1") -> str:
    """An embedded S3-compatible server (moto) on a free port; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # moto serves through werkzeug, which prints a line per request unless told otherwise.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    return f"http://{host}:{port}"


def worker_argv(name: str = "local") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--hostname", f"{name}-{os.getpid()}@%h",
    ]


def api_argv(host: str, port: int, workers: int = 1) -> list[str]:
    """uvicorn serving the API; ``workers`` > 1: that many processes on the one port (one
    Python process serves requests on one core at a time)."""
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port)]
    return argv + ["--workers", str(workers)] if workers > 1 else argv


def check_alive(procs: dict[str, subprocess.Popen], log_dir: Path = LOG_DIR) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise LocalError(f"the {name} exited (status {proc.returncode}); see {log_dir / (name + '.log')}")


def wait_ready(api_url: str, procs: dict[str, subprocess.Popen], timeout: float = 90,
               log_dir: Path = LOG_DIR) -> None:
    deadline = time.monotonic() + timeout
    while True:
        check_alive(procs, log_dir)
        try:
            if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise LocalError(f"the API at {api_url} was not ready after {timeout:.0f}s; see {log_dir}")
        time.sleep(0.25)


def wait_for_job(client: httpx.Client, api_url: str, job_id: str, timeout: float = 600,
                 on_change: Optional[Callable[[dict], None]] = None) -> dict:
    """Poll a job until it finishes; returns its last representation."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        job = client.get(f"{api_url}/v1/jobs/{job_id}").raise_for_status().json()
        view = (job["state"], job["progress"]["stage"], job["progress"]["percent"])
        if on_change and view != last:
            on_change(job)
        last = view
        if job["state"] in FINISHED:
            return job
        if time.monotonic() > deadline:
            raise LocalError(f"job {job_id} still {job['state']} after {timeout:.0f}s")
        time.sleep(0.25)


def _print_progress(job: dict) -> None:
    p = job["progress"]
    in_layers = p.get("stage") in ("converting", "checking") and p.get("layers_total")
    layers = f", layer {p['layers_done']}/{p['layers_total']}" if in_layers else ""
    print(f"  {job['state']:<12} {p['percent']:5.1f}%  {p.get('stage') or ''}{layers}", flush=True)


def session_api_key(env: dict, log_dir: Path) -> str:
    """A fresh key for this run: accepted by the API (added to ``env``), saved for curl."""
    import hashlib
    import secrets

    key = "ak_local_" + secrets.token_urlsafe(24)
    entry = f"local:{hashlib.sha256(key.encode()).hexdigest()}"
    configured = [e for e in env.get("ATTNONLY_API_KEYS", "").split(",") if e.strip()]
    env["ATTNONLY_API_KEYS"] = ",".join([*configured, entry])
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "api-key"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(key + "\n")
    return key


def run_demo(api_url: str, source_url: str, api_key: Optional[str] = None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=30, headers=headers) as client:
        created = client.post(f"{api_url}/v1/jobs", json={"source_url": source_url, "options": DEMO_OPTIONS})
        created.raise_for_status()
        job_id = created.json()["id"]
        print(f"\nSubmitted demo job {job_id} for {source_url}", flush=True)
        job = wait_for_job(client, api_url, job_id, on_change=_print_progress)
        if job["state"] != "succeeded":
            print(f"\nDemo job {job['state']}: {job.get('error')}", flush=True)
            return False
        print(f"\nDemo job succeeded. Summary: {job['summary']}\nArtifacts:")
        for artifact in job["artifacts"]:
            presigned = client.get(artifact["url"], follow_redirects=False).headers.get("location")
            print(f"  {artifact['name']:<18} {artifact['size']:>9} bytes\n"
                  f"    API:      {artifact['url']}\n    download: {presigned}")
        print(f"\nDownload one:  curl -L -H 'Authorization: Bearer <key>' -o model.safetensors "
              f"{api_url}/v1/jobs/{job_id}/artifacts/model.safetensors", flush=True)
        return True


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def service_env(redis_url: str, s3: Optional[dict]) -> dict:
    env = dict(os.environ)
    env["ATTNONLY_REDIS_URL"] = redis_url
    if s3:
        env.update(s3)
    allow = [h for h in env.get("ATTNONLY_FETCH_ALLOW_HOSTS", "").split(",") if h.strip()]
    env["ATTNONLY_FETCH_ALLOW_HOSTS"] = ",".join(dict.fromkeys([*allow, *LOOPBACK]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def settings_for(env: dict):
    """The settings that child processes started with ``env`` will read."""
    from shared.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    return Settings(**{k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)})


def prepare_bucket(env: dict) -> None:
    """Create the artifact bucket, so that /readyz turns green before any job ran."""
    from shared.storage import Storage, StorageError

    try:
        Storage(settings_for(env)).ensure_bucket()
    except StorageError as exc:
        raise LocalError(f"S3 is not usable: {exc.message}") from None


def start_backends(settings, stack: ExitStack, log_dir: Path) -> dict:
    """Redis and S3 as configured, or started here; returns the children's environment."""
    started = ensure_redis(settings.redis_url, stack, log_dir)
    print(f"Redis:  {settings.redis_url}{' (started here)' if started else ''}", flush=True)
    s3_env = None
    if settings.s3_endpoint_url is None:
        endpoint = start_s3_server(stack)
        # The embedded server takes any credentials; these are not secrets.
        s3_env = {"ATTNONLY_S3_ENDPOINT_URL": endpoint, "ATTNONLY_S3_ACCESS_KEY": "local-dev",
                  "ATTNONLY_S3_SECRET_KEY": "local-dev"}
        print(f"S3:     {endpoint} (embedded, data lost at exit)", flush=True)
    else:
        print(f"S3:     {settings.s3_endpoint_url}", flush=True)
    env = service_env(settings.redis_url, s3_env)
    prepare_bucket(env)
    return env


def start_demo_source(stack: ExitStack) -> str:
    """Save a tiny GPT-2 and serve it on loopback; returns its source URL."""
    from deploy.demo import make_tiny_checkpoint, serve_directory

    root = Path(tempfile.mkdtemp(prefix="attnonly-demo-"))
    stack.callback(shutil.rmtree, root, True)
    print("\nMaking a tiny GPT-2 with random weights for the demo...", flush=True)
    make_tiny_checkpoint(root / "gpt2-tiny", "gpt2")
    return stack.enter_context(serve_directory(root)) + "gpt2-tiny/"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    parser.add_argument("--port", type=int, default=8000, help="port of the API")
    parser.add_argument("--api-workers", type=int, default=2,
                        help="uvicorn worker processes of the API (one process uses one core)")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop everything after the demo job")
    parser.add_argument("--no-demo", action="store_true", help="start the service only")
    parser.add_argument("--log-dir", type=Path, default=LOG_DIR, help="where the children's logs go")
    args = parser.parse_args(argv)

    from shared.settings import get_settings

    api_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    # SIGTERM ends the runner like Ctrl-C does: the ExitStack below stops every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        try:
            env = start_backends(get_settings(), stack, args.log_dir)
            api_key = session_api_key(env, args.log_dir)
            if _port_taken(args.port):
                raise LocalError(f"port {args.port} is taken; pass --port to use another")
            procs = {
                "worker": start_process("worker", worker_argv(), env, stack, args.log_dir),
                "api": start_process("api", api_argv(args.host, args.port, args.api_workers), env, stack,
                                     args.log_dir),
            }
            wait_ready(api_url, procs, log_dir=args.log_dir)
            print(f"API:    {api_url}  (docs: {api_url}/docs)\nLogs:   {args.log_dir}", flush=True)
            print(f"Key:    {api_key}  (for this run; also in {args.log_dir / 'api-key'})\n"
                  f"        curl -H 'Authorization: Bearer {api_key}' {api_url}/v1/jobs", flush=True)

            ok = args.no_demo or run_demo(api_url, start_demo_source(stack), api_key)
            if args.exit_after_demo:
                return 0 if ok else 1
            print("\nThe service is running. Ctrl-C stops it.", flush=True)
            while True:
                check_alive(procs, args.log_dir)
                time.sleep(1)
        except LocalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nStopping...", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main())
