"""ROME (DESIGN §3): rank-one edits of one layer; `update` holds the algorithm, `method` registers it."""
from massedit.methods.rome.method import Rome

__all__ = ["Rome"]
