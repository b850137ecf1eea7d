"""Fault injection now lives in megaslm/faults.py (used by train/ and reference/ alike); this name stays for imports."""

from megaslm.faults import InjectedFault, corrupt_loss, maybe_fail, maybe_fail_write  # noqa: F401
