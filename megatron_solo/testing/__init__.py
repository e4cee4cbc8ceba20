"""Test support shipped with the package: the multi-process check runner used by tests/workers/."""
