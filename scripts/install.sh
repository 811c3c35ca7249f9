#!/usr/bin/env bash
# Install swarm and its test tools into the current Python (idempotent, fast when already done).
# torch comes first: an unpinned torch would pull the newest CUDA build (gigabytes); 2.13.0 is the
# tested CPU build. An existing torch is kept, so GPU machines keep theirs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
