"""Weight deltas (format, apply/revert), ledgers and sequential editing."""
