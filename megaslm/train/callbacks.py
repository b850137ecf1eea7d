"""The callback base class now lives in megaslm/callbacks.py (below every package); this name stays for imports."""

from megaslm.callbacks import Callback, StateRegistry  # noqa: F401
