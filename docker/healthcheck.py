#!/usr/bin/env python3
"""The image's health check (`swarm-healthcheck [URL]`): healthy when URL answers 200 within 3 s.

URL defaults to $SWARM_HEALTHCHECK_URL, else the registry's `/healthz` on $SWARM_REGISTRY_PORT (7000), the
image's default command. A `/healthz` page must also say `ok` (a registry) or `online` (a node): a node still
loading its layers (`joining`) or `draining` is not healthy. In a private swarm $SWARM_TOKEN is sent.
Only the standard library: it runs every few seconds in every container.
"""

from __future__ import annotations

import os
import sys
import urllib.request

HEALTHY_PAGES = {"ok", "online"}


def main() -> int:
    default = f"http://127.0.0.1:{os.environ.get('SWARM_REGISTRY_PORT', '7000')}/healthz"
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SWARM_HEALTHCHECK_URL", default)
    request = urllib.request.Request(url)
    if os.environ.get("SWARM_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['SWARM_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=3) as reply:
            body = reply.read(256).decode(errors="replace").strip()
    except OSError as exc:  # refused, timed out, or an HTTP error status
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if url.rstrip("/").endswith("/healthz") and body not in HEALTHY_PAGES:
        print(f"{url}: {body!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
