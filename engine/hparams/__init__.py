"""Hyperparameters: the shared MEMIT / ROME keys and their files (`params`), how a key is declared
(`keys`), and the values massedit picks when none are given (`defaults`, with the presets as data
files in ``presets/``). A method's own keys live with the method (`massedit.methods`)."""
from massedit.hparams.defaults import PRESETS, default_for, load_hparams, preset, preset_name_for, world_preset
from massedit.hparams.keys import HParamsError, above, at_least, between, hparam, one_of
from massedit.hparams.params import (
    EXTRA_KEYS,
    METHOD_HPARAMS,
    MOM2_DTYPES,
    MEMITHyperParams,
    default_layers,
    register_hparams,
)

__all__ = [
    "HParamsError", "MEMITHyperParams", "MOM2_DTYPES", "EXTRA_KEYS", "METHOD_HPARAMS", "register_hparams",
    "hparam", "above", "at_least", "between", "one_of",
    "PRESETS", "preset", "load_hparams", "preset_name_for", "default_for", "default_layers", "world_preset",
]
