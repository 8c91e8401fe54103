"""Run every benchmark (forward, generate, conversion, bytes) in its own process, sharing
one work directory so each model is built and converted once, then print the final table.

    .venv/bin/python bench/run_all.py                    # full run (~10-15 min on 2 CPU cores)
    .venv/bin/python bench/run_all.py --quick            # tiny smoke run (~80 s on 2 busy CPU cores)
    .venv/bin/python bench/run_all.py --workdir /tmp/b   # keep the checkpoints for later runs
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

SCRIPTS = ["forward", "generate", "conversion", "bytes"]


def extra_args(parser):
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, default=SCRIPTS)


def format_value(value):
    if isinstance(value, float):
        return common.fmt_ratio(value)
    return str(value)


def main(argv=None):
    args = common.parse_args("run all benchmarks and print the final table", argv, extra_args)
    started = time.perf_counter()
    print(common.machine_line())
    print(common.code_line())
    print(common.NO_GPU_NOTE, flush=True)
    rows = []
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    with common.workdir(args.workdir) as root, tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            summary = Path(tmp) / f"{name}.json"
            command = [sys.executable, str(common.ROOT / "bench" / f"{name}.py"), "--workdir", str(root),
                       "--json", str(summary)] + (["--quick"] if args.quick else []) + common.thread_args(args)
            print(f"\n##### bench/{name}.py", flush=True)
            t = time.perf_counter()
            done = subprocess.run(command, cwd=common.ROOT, env=env)
            print(f"##### bench/{name}.py: exit {done.returncode}, {time.perf_counter() - t:.0f} s", flush=True)
            if done.returncode != 0:
                rows.append([f"bench/{name}.py", f"FAILED (exit {done.returncode})", "", ""])
                continue
            for row in json.loads(summary.read_text()):
                target = row["target"] or ""
                met = "" if args.quick else {True: "yes", False: "NO", None: ""}[row["met"]]
                rows.append([row["metric"], format_value(row["value"]), target, met])
    print(f"\n{common.machine_line()}")
    print(common.code_line())
    common.print_table(f"final table ({'quick smoke run, tiny models' if args.quick else 'full run'}; "
                       f"total {time.perf_counter() - started:.0f} s)",
                       ["metric", "measured", "target", "met"], rows)
    print(common.NO_GPU_NOTE)
    return 1 if any(r[1].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
