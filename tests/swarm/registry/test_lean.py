"""A registry never touches a tensor, so it never loads torch: it idles in tens of MiB, not hundreds."""

from __future__ import annotations

import subprocess
import sys


def test_the_registry_and_the_protocol_load_no_torch() -> None:
    probe = "import sys, swarm.registry.server, swarm.registry.main, swarm.protocol, swarm.transport; "
    probe += "sys.exit(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules) or None)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
