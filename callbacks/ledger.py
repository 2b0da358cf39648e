"""The hash ledger as the CLI sees it: ``python -m callbacks diff A B`` calls :func:`diff_ledgers`.

The format, writer and reader live in :mod:`callbacks.hashing.ledger`; this module is the engine-level name.
"""

from __future__ import annotations

from callbacks.hashing.ledger import LedgerError, LedgerRecord, LedgerWriter, diff_ledgers, read_ledger

__all__ = ["LedgerError", "LedgerRecord", "LedgerWriter", "diff_ledgers", "read_ledger"]
