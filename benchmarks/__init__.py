"""Performance harness: the relay beside Debian's Postfix, same workload, same run.

Nothing here runs in the test suite. Entry point: `python benchmarks/run.py` (see README.md).
"""
