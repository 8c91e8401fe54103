#!/usr/bin/env bash
# The one command for a machine without Docker: install everything, then run the whole
# service locally and convert a demo checkpoint (python -m deploy.local; pass its flags,
# e.g. --exit-after-demo or --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
exec .venv/bin/python -m deploy.local "$@"
