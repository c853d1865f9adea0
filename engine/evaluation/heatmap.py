"""Heat maps of a causal trace (ROME's Figure 1): token group × layer, one PNG per kind, written
by `massedit trace` and `massedit demo`. matplotlib is optional: without it nothing is drawn."""
from __future__ import annotations

from pathlib import Path

from massedit.evaluation.trace import GROUPS, KINDS, TraceResult
from massedit.files import written

_TITLES = {"hidden": "block output (residual stream)", "mlp": "MLP output", "attn": "attention output"}
_COLORS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def write_heatmaps(result: TraceResult, out: Path, kinds=KINDS) -> list[Path]:
    """OUT/trace_<kind>.png for each kind, like the ROME paper's Figure 1; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for kind in kinds:
        effect = result.averaged(kind).numpy()
        fig, ax = plt.subplots(figsize=(max(5.0, 2.4 + 0.3 * effect.shape[1]), 2.8))
        image = ax.imshow(effect, cmap=_COLORS[kind], aspect="auto", vmin=min(0.0, float(effect[effect == effect].min())))
        ax.set_yticks(range(len(GROUPS)), GROUPS)
        ax.set_xticks(range(effect.shape[1]))
        ax.set_xlabel("layer" + (f" (window of {result.window})" if kind != "hidden" else ""))
        ax.set_title(f"Restoring the {_TITLES[kind]}\n(average over {len(result.traces)} facts)", fontsize=9)
        fig.colorbar(image, ax=ax, label="P(o) restored − corrupted")
        fig.tight_layout()
        path = out / f"trace_{kind}.png"
        with written(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
