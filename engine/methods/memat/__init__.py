"""MEMAT (DESIGN §4): MEMIT, then attention-head corrections chosen by probes (`heads`, `probes`)."""
from massedit.methods.memat.method import Memat

__all__ = ["Memat"]
