#!/usr/bin/env bash
# The README's first command: install, then run a local swarm on the embedded model and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m swarm.client.cli.demo "$@"
