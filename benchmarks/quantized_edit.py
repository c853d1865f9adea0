"""Editing a bitsandbytes 8-bit / 4-bit base, side by side with the same model in float32.

    python -m benchmarks.quantized_edit --world DIR [--n 100] [--out FILE]

DIR is a `massedit world build` directory (DIR/model, DIR/counterfact.json, DIR/corpus.txt). The
model is loaded three times: float32, 8-bit (LLM.int8) and 4-bit (nf4, float32 compute). Each base
gets its own statistics (keys come from the quantized model's activations) and the same edit of
the first n CounterFact records with `world_preset`. For each base:

* ES / PS / NS (percent) of the n records before and after the edit (`massedit.evaluation.evaluate`);
* bytes of the edited modules as loaded, and of the dense stand-ins that hold W + ΔW
  (massedit.model.quantized);
* what re-quantizing instead would keep: per edited layer, ‖ΔW‖ / ‖W‖ and the relative error
  ‖Q(W + ΔW) − Q(W) − ΔW‖ / ‖ΔW‖ of the edit after bitsandbytes' own quantize/dequantize round
  trip (Q), for ΔW and for ΔW / 10 and ΔW / 100 (smaller edits, as in larger models), and ES / PS
  with the re-quantized weights in place of the stand-ins;
* whether revert gave back every stored tensor of the edited modules bit for bit.

Writes JSON to benchmarks/results/quantized_edit-<time>.json (or --out) and prints a table.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import common

BASES = ("float32", "8bit", "4bit")
SCALES = (1.0, 0.1, 0.01)


def _load(model_dir: Path, base: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = {
        "float32": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    }[base]
    kwargs = {"quantization_config": config} if config is not None else {"dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def _module_bytes(module) -> int:
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=False).values() if torch.is_tensor(v))
    scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is not None and getattr(module.weight, "SCB", None) is None:
        total += scb.numel() * scb.element_size()
    return total


def _digest(module) -> str:
    h = hashlib.sha256()
    tensors = [t for _, t in sorted(module.state_dict().items())]
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        tensors += [v for _, v in sorted(state.as_dict(packed=False).items()) if torch.is_tensor(v)]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _requantized(w: torch.Tensor, base: str) -> torch.Tensor:
    """bitsandbytes' quantize → dequantize round trip of a [out, in] float weight."""
    import bitsandbytes.functional as F

    if base == "8bit":
        q, scb, _ = F.int8_vectorwise_quant(w.half())
        return F.int8_vectorwise_dequant(q, scb)
    q, state = F.quantize_4bit(w.float(), quant_type="nf4", blocksize=64)
    return F.dequantize_4bit(q, state)


def _scores(model, tok, records) -> dict:
    from massedit.evaluation import evaluate, summary
    from massedit.model.quantized import cpu_repacking_off

    with torch.no_grad(), cpu_repacking_off(model):
        return {k: round(v, 2) for k, v in summary(evaluate(model, tok, records)).items() if k in ("ES", "PS", "NS")}


def run_base(world: Path, base: str, records: list, corpus: list[str], stats_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from massedit import MassEditor, world_preset
    from massedit.model.arch import stores_transposed
    from massedit.model.quantized import dequantized, storage_of

    model = _load(world / "model", base)
    tok = AutoTokenizer.from_pretrained(world / "model")
    hp = world_preset(model.config)
    editor = MassEditor(model, tok, hp, stats_dir=stats_dir / base, corpus=corpus, model_name=f"world-{base}",
                        progress=False)
    names = [editor.layout.rewrite_name(l) for l in hp.layers]
    out: dict = {"base": base, "layers": list(hp.layers), "pre": _scores(model, tok, records)}
    originals = {n: model.get_submodule(n) for n in names}
    out["storage"] = {n: storage_of(m) for n, m in originals.items()}
    out["edited_bytes_as_loaded"] = sum(_module_bytes(m) for m in originals.values())
    digests = {n: _digest(m) for n, m in originals.items()}
    w0 = {n: dequantized(m).detach().float().clone() for n, m in originals.items()}

    result = editor.edit(records)
    out["timings"] = {k: round(v, 3) for k, v in result.timings.items()}
    out["post"] = _scores(model, tok, records)
    stand_ins = {n: model.get_submodule(n) for n in names}
    out["edited_bytes_edited"] = sum(_module_bytes(m) for m in stand_ins.values())

    if base != "float32":
        kept, saved = [], {}
        for n, module in stand_ins.items():
            w = dequantized(module).detach().float()
            dw = w - w0[n]
            q0 = _requantized(w0[n], base)
            row = {"layer": n, "dW_over_W": round(float(dw.norm() / w0[n].norm()), 4)}
            for s in SCALES:
                err = _requantized(w0[n] + s * dw, base) - q0 - s * dw
                row[f"rel_error_x{s:g}"] = round(float(err.norm() / (s * dw).norm()), 3)
            kept.append(row)
            saved[n] = module.weight.detach().clone()
            requant = _requantized(w, base).to(module.weight.dtype)
            module.weight.data.copy_(requant.T if stores_transposed(module) else requant)
        out["requantized"] = {"layers": kept, "scores": _scores(model, tok, records)}
        for n, module in stand_ins.items():
            module.weight.data.copy_(saved[n])

    result.delta.revert(model)
    out["revert_bit_identical"] = all(
        model.get_submodule(n) is originals[n] and _digest(originals[n]) == digests[n] for n in names)
    return out


def _table(runs: Sequence[dict]) -> str:
    header = ["base", "ES pre", "ES post", "PS post", "NS post", "edited MB as loaded", "edited MB (stand-ins)",
              "ES re-quantized", "rel. error of re-quantized ΔW (×1 / ×0.1 / ×0.01)", "revert exact"]
    rows = []
    for r in runs:
        rq = r.get("requantized")
        errs = "-" if not rq else " ; ".join(
            "/".join(str(row[f"rel_error_x{s:g}"]) for s in SCALES) for row in rq["layers"])
        rows.append([r["base"], str(r["pre"].get("ES")), str(r["post"].get("ES")), str(r["post"].get("PS")),
                     str(r["post"].get("NS")), f"{r['edited_bytes_as_loaded'] / 1e6:.3f}",
                     f"{r['edited_bytes_edited'] / 1e6:.3f}", str(rq["scores"].get("ES")) if rq else "-", errs,
                     str(r["revert_bit_identical"])])
    return common.markdown_table(header, rows)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser("quantized_edit", __doc__)
    parser.add_argument("--world", required=True, type=Path, help="a `massedit world build` directory")
    parser.add_argument("--n", type=int, default=100, help="CounterFact records to edit (the first n)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/quantized_edit-<time>.json)")
    args = parser.parse_args(argv)
    if not (args.world / "model" / "config.json").exists():
        parser.error(f"{args.world} is not a world build (no model/config.json); run `massedit world build` first")
    records = json.loads((args.world / "counterfact.json").read_text(encoding="utf-8"))[: args.n]
    corpus = [line for line in (args.world / "corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_base(args.world, base, records, corpus, Path(tmp)) for base in BASES]
    data = {"suite": "quantized_edit", "world": str(args.world), "n": len(records), "machine": common.machine_info(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": runs}
    out = common.write_json(common.result_path("quantized_edit", args.out), data)
    print(_table(runs))
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
