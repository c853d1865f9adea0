"""Smoke test of the GPU-scale benchmark: its CPU mode runs end to end and writes the expected JSON
(no timing goals), and without a GPU the full mode exits with code 2 and says why."""
import json

import pytest
import torch

from benchmarks import common, gpu_scale


@pytest.mark.parametrize("arch", ["gptj-6b", "llama-8b"])
def test_gpu_scale_smoke(tmp_path, arch):
    out = tmp_path / "x.json"
    result = gpu_scale.main(["--arch", arch, "--smoke", "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert result["out"] == str(out)

    for key in ("benchmark", "arch", "smoke", "timestamp", "machine", "model", "tokenizer", "hparams",
                "context_templates", "requests", "statistics", "batched", "z_phase", "memory", "serial"):
        assert key in data, key
    assert data["benchmark"] == "gpu_scale" and data["arch"] == arch and data["smoke"] is True
    for key in ("torch", "transformers", "cuda", "gpu", "peak_bf16_dense_flops"):
        assert key in data["machine"], key
    assert data["model"]["model_type"] == {"gptj-6b": "gptj", "llama-8b": "llama"}[arch]
    assert data["model"]["n_layers"] == 2 and data["model"]["hidden_size"] == 64
    assert "random" in data["model"]["init"] and "does not depend on the weights" in data["model"]["init"]
    assert data["requests"]["n"] == 4
    assert data["context_templates"][0] == ["{}"] and len(data["context_templates"][1]) == 5

    b = data["batched"]
    for key in ("z_s", "keys_s", "solve_s", "total_s", "wall_s"):
        assert b[key] > 0, key
    assert b["z_steps_mean"] == 1  # 2 iterations (steps 0 and 1), no early stop on random weights

    z = data["z_phase"]
    assert z["path"] == "prefix"
    assert z["tokens"] > 0 and z["tokens_per_s"] > 0 and z["flops"] > 0
    assert z["flops_backward_4x"] > z["flops"]
    assert z["padded_positions"] >= z["tokens"]
    assert z["iterations_total"] == 4 * 2
    assert z["mfu"] is None and z["mfu_backward_4x"] is None  # CPU: no peak to compare with
    assert z["flops_formula"]

    st = data["statistics"]
    assert st["factor_s"] > 0 and set(st["key_scale"]) == {"0"} and st["key_scale"]["0"] > 0

    s = data["serial"]
    assert s["k"] == 4
    for key in ("z_s", "total_s"):
        assert s["measured"][key] > 0 and s["extrapolated_to_n"][key] > 0, key
    assert s["ratio_extrapolated_serial_over_batched"]["z"] > 0
    assert "EXTRAPOLATED" in s["note"]
    assert data["memory"]["batched_peak_bytes"] is None  # CPU


def test_gpu_scale_needs_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as err:
        gpu_scale.main(["--arch", "gptj-6b"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "needs a CUDA GPU" in message and "--smoke" in message


def test_z_flop_formula_matches_counted_flops():
    """The documented z-phase FLOP formula (backward = activation gradients only) against
    torch's FlopCounterMode on a tiny GPT-J: linear-layer FLOPs (mm/addmm; attention's bmm left
    out, as in the formula) exceed the formula only by the padding the formula leaves out."""
    from torch.utils.flop_counter import FlopCounterMode

    from massedit.model.arch import ModelLayout
    from massedit.hparams import preset
    from massedit.inputs.requests import parse_records
    from massedit.compute.targets import TargetOptimizer, ZSettings

    tok = common.train_tokenizer(gpu_scale.tokenizer_corpus(300, 0), 800)
    model = gpu_scale.build_model(gpu_scale.model_config("gptj-6b", True, len(tok)), torch.device("cpu"),
                                  torch.float32, 0)
    hp = preset("gpt-j-6b").replace(layers=[0], v_loss_layer=1, v_num_grad_steps=3)
    layout = ModelLayout(model)
    reqs = parse_records(common.make_requests(common.make_subjects(2, 0), 0), "requests")
    opt = TargetOptimizer(model, layout, tok, ZSettings.from_hparams(hp, layout), common.CONTEXT_TEMPLATES)
    with FlopCounterMode(display=False) as fc:
        z = opt.optimize(reqs, batch_size=1, progress=False)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    linear = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    acc = gpu_scale.z_accounting(tok, reqs, common.CONTEXT_TEMPLATES, z.steps.tolist(), "prefix",
                                 gpu_scale.block_params(layout, range(0, 2)), gpu_scale.block_params(layout, [1]),
                                 layout.lm_head.weight.numel())
    assert acc["iterations_total"] == 2 * 3
    assert 1.0 <= linear / acc["flops"] <= 1.25, (linear, acc)
    assert linear < acc["flops_backward_4x"]
