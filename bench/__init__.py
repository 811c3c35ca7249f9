"""Benchmarks, run as scripts: `python bench/latency.py`.

Each script puts the repository, not `bench/`, first on `sys.path` before importing anything: `bench/profile.py`
would otherwise stand in for the standard library's `profile`, which torch imports.
"""
