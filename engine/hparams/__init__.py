"""Hyperparameters (massedit.hparams.params)."""
from massedit.hparams.params import *  # noqa: F401,F403
from massedit.hparams.params import __all__, world_preset  # noqa: F401
