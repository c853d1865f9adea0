"""massedit: batched knowledge editing for causal language models.

    from massedit import MassEditor
    editor = MassEditor(model, tokenizer, hparams, stats_dir="stats", corpus="corpus.txt")
    result = editor.edit(requests)          # result.delta: save / apply / revert
"""

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """Make `massedit.kernels` importable from a source checkout (editable install).

    The top-level folder kernels/ installs as massedit.kernels. It has no __init__.py on purpose:
    a regular package there would shadow Hugging Face's `kernels` (imported by transformers and
    bitsandbytes) for anything run from the repository root. setuptools' editable finder cannot
    map a nested folder without __init__.py, so the checkout's folder is registered here; an
    installed copy has massedit/kernels/ inside the package and needs nothing."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isdir(source) or f"{__name__}.kernels" in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)


_source_tree_kernels()

from massedit.edits.delta import EditDelta, WeightDelta  # noqa: E402
from massedit.editor import EditResult, MassEditor  # noqa: E402
from massedit.hparams import MEMITHyperParams, default_for, preset, world_preset  # noqa: E402
from massedit.inputs.requests import EditRequest, load_requests  # noqa: E402

__all__ = [
    "MassEditor", "EditResult", "EditDelta", "WeightDelta", "EditRequest", "load_requests", "MEMITHyperParams",
    "default_for", "preset", "world_preset", "__version__",
]
