"""`attnonly` through the HTTP API: submit, status, list, cancel, watch, download."""
from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

from .cli import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_SERVICE, EXIT_USAGE, error, fmt, options_from, table

# ClientError codes raised on this side that are the user's input, not the service's fault.
INPUT_CODES = {"no_api_url", "invalid_job_id", "no_artifacts"}


def exit_code_for(exc) -> int:
    """The exit status for a ClientError (see the epilog)."""
    if exc.code in INPUT_CODES:
        return EXIT_USAGE
    if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429) \
            and not exc.code.startswith(("download_", "artifact_")):
        return EXIT_USAGE
    return EXIT_SERVICE


def exit_code_for_job(job) -> int:
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(job.state, EXIT_FAILED)


class JobBar:
    """A tqdm bar over a job's percent, its description the state and stage."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.bar = tqdm(total=100.0, unit="%", file=sys.stderr, leave=True, desc=f"{job_id[:8]} waiting",
                        bar_format="{desc}: {percentage:5.1f}%|{bar}| [{elapsed}]{postfix}")

    def __call__(self, job) -> None:
        p = job.progress
        stage = p.stage if p.stage and p.stage != job.state and not job.finished else ""
        self.bar.set_description_str(f"{job.id[:8]} {job.state}{' ' + stage if stage else ''}", refresh=False)
        layers = f"layer {p.layers_done}/{p.layers_total}" \
            if p.layers_total and p.layers_done is not None and not job.finished else ""
        self.bar.set_postfix_str(layers + (" cancel requested" if job.cancel_requested and not job.finished else ""),
                                 refresh=False)
        percent = 100.0 if job.state == "succeeded" else max(0.0, min(100.0, p.percent))
        self.bar.n = percent
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def report_outcome(job) -> int:
    """One line on stderr for a finished job; its exit status."""
    if job.state == "succeeded":
        passed = (job.summary or {}).get("passed")
        print(f"job {job.id} succeeded" + (" (checks passed)" if passed else ""), file=sys.stderr)
    elif job.state == "cancelled":
        print(f"job {job.id} cancelled", file=sys.stderr)
    else:
        err = job.error
        error(err.code if err else "failed", f"job {job.id} {job.state}: {err.message if err else 'no reason given'}")
    return exit_code_for_job(job)


def wait_with_bar(api, job_id: str):
    bar = JobBar(job_id)
    try:
        return api.wait(job_id, on_progress=bar)
    finally:
        bar.close()


def download_into(api, job, directory: str) -> None:
    for path in api.download(job.id, directory, job=job):
        print(path)


def print_job(job) -> None:
    p = job.progress
    rows = [
        ("id", job.id), ("state", job.state + (" (cancel requested)" if job.cancel_requested and not job.finished else "")),
        ("source", job.source_url or "-"),
        ("progress", "-" if job.finished else f"{p.percent:.1f}%" + (f" {p.stage}" if p.stage else "")
         + (f", layer {p.layers_done}/{p.layers_total}" if p.layers_total and p.layers_done is not None else "")),
        ("created", job.created_at.isoformat() if job.created_at else "-"),
        ("finished", job.finished_at.isoformat() if job.finished_at else "-"),
        ("attempts", str(job.attempts)),
    ]
    if job.reused_from:
        rows.append(("reused from", job.reused_from))
    if job.error:
        rows.append(("error", f"[{job.error.code}] {job.error.message}"))
    for key in ("passed", "ffn_sites", "attention_heads_added", "max_local_rel", "logits_max_rel", "kl_max"):
        if job.summary and job.summary.get(key) is not None:
            rows.append((key, fmt(job.summary[key])))
    for artifact in job.artifacts:
        rows.append(("artifact", f"{artifact.name} ({artifact.size} bytes)"
                     + (f" sha256 {artifact.sha256}" if artifact.sha256 else "")))
    for key, value in rows:
        print(f"{key:<22} {value}")


def job_json(job) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(job), default=str))


def run_service(args) -> int:
    from .client import Client, ClientError

    url = args.api_url or os.environ.get("ATTNONLY_API_URL")
    key = args.api_key or os.environ.get("ATTNONLY_API_KEY")
    if not url:
        error("no_api_url", "no service URL: pass --api-url or set ATTNONLY_API_URL")
        return EXIT_USAGE
    job_id = None
    try:
        with Client(url, key) as api:
            if args.command == "submit":
                try:
                    options = options_from(args.option or [])
                except ValueError as exc:
                    error("invalid_options", str(exc))
                    return EXIT_USAGE
                job = api.submit(args.source_url, options or None, args.idempotency_key)
                job_id = job.id
                print(job.id, flush=True)
                if job.replayed:
                    print(f"job {job.id}: an earlier submission with this idempotency key", file=sys.stderr)
                if not (args.wait or args.download):
                    return EXIT_OK
                job = wait_with_bar(api, job.id)
                code = report_outcome(job)
                if args.download and job.artifacts:
                    download_into(api, job, args.download)
                return code
            if args.command == "watch":
                job_id = args.id
                return report_outcome(wait_with_bar(api, args.id))
            if args.command == "status":
                job = api.status(args.id)
                if args.json:
                    print(json.dumps(job_json(job), indent=2))
                else:
                    print_job(job)
                return EXIT_OK
            if args.command == "list":
                jobs = api.list(state=args.state, limit=args.limit)
                if args.json:
                    print(json.dumps([job_json(j) for j in jobs], indent=2))
                elif jobs:
                    rows = [("id", "state", "progress", "created", "source")]
                    rows += [(j.id, j.state, f"{j.progress.percent:.0f}%",
                              j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "-", j.source_url or "-")
                             for j in jobs]
                    print("\n".join(table(rows)))
                return EXIT_OK
            if args.command == "cancel":
                job = api.cancel(args.id)
                print(f"job {job.id} {job.state}" + (" (cancel requested; it stops within a layer)"
                                                     if job.cancel_requested and not job.finished else ""))
                return EXIT_OK
            if args.command == "download":
                job = api.status(args.id)
                if not job.artifacts:
                    error("no_artifacts", f"job {job.id} has no artifacts (it is {job.state})")
                    return EXIT_USAGE if job.state != "failed" else EXIT_FAILED
                download_into(api, job, args.dir)
                return EXIT_OK if job.state == "succeeded" else report_outcome(job)
    except ClientError as exc:
        error(exc.code, exc.message)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        if job_id:
            print(f"\ninterrupted; job {job_id} goes on (attnonly watch {job_id})", file=sys.stderr)
        return 130
    raise AssertionError(args.command)
