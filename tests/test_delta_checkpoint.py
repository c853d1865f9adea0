"""`massedit delta apply|revert` on checkpoints on disk (massedit.edits.checkpoint): the result is
"load, apply the delta, save" bit for bit, revert gives the original bytes back, and a checkpoint
that already holds the delta, lacks it, or belongs to another model is refused before anything is
written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

import massedit.cli as cli
import massedit.edits.delta as delta_mod
from massedit.edits.checkpoint import CheckpointError, prepare
from massedit.edits.delta import DeltaError, EditDelta, WeightDelta, config_hash
from massedit.model.arch import ModelLayout
from massedit.model.loading import dtype_kwargs
from tiny import make_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _delta(model, layers=(0, 2, 3), n=4, seed=1) -> EditDelta:
    """Rank-n factors large enough that W + Δ - Δ is not W everywhere (fix-ups are exercised)."""
    layout, g = ModelLayout(model), torch.Generator().manual_seed(seed)
    weights = [WeightDelta(layout.rewrite_weight_name(layer), torch.randn(layout.hidden_size, n, generator=g),
                           torch.randn(layout.key_dim(layer), n, generator=g), layout.rewrite_is_conv1d(layer))
               for layer in layers]
    return EditDelta(weights, {"config_hash": config_hash(model)})


def _shard_size(model) -> int:
    """A max_shard_size that cuts the tiny models into 3 shards."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()) / 2.5) + 1


def _save_hf(model, tok, path: Path, shard_size=None) -> Path:
    """Saved as a loaded model saves it: a model built from its config orders its state dict, hence
    its shards, differently, so only a reloaded one is a fixed point of load-save."""
    shards = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path.with_name(path.name + "-built"), **shards)
    loaded = AutoModelForCausalLM.from_pretrained(path.with_name(path.name + "-built"), **dtype_kwargs(model.dtype))
    loaded.save_pretrained(path, **shards)
    tok.save_pretrained(path)
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _delta_cli(action, checkpoint, delta_file, out, *extra) -> int:
    return cli.main(["delta", action, "--checkpoint", str(checkpoint), "--delta", str(delta_file),
                     "--out", str(out), *extra])


def _reference(base: Path, delta: EditDelta, dtype, path: Path, shard_size) -> Path:
    """Load, apply, save: what the checkpoint commands must reproduce. Leaves `delta` recorded."""
    model = AutoModelForCausalLM.from_pretrained(base, **dtype_kwargs(dtype))
    delta.apply(model)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    return path


@pytest.mark.parametrize("kind,dtype,sharded,blocks", [("gpt2", torch.float32, True, False),
                                                       ("llama", torch.float32, True, False),
                                                       ("llama", torch.bfloat16, False, False),
                                                       ("gpt2", torch.float32, True, True),
                                                       ("llama", torch.bfloat16, True, True)])
def test_safetensors_apply_is_load_apply_save_and_revert_restores_the_bytes(kind, dtype, sharded, blocks, tmp_path,
                                                                            capsys, monkeypatch):
    if blocks:  # each weight streamed in many row blocks (ragged last one) and pieces, as large ones are
        monkeypatch.setattr(delta_mod, "_CHUNK_BYTES", 8 * 64 * 5)
        monkeypatch.setattr(delta_mod, "_PIECE_BYTES", 8 * 64 * 2)
    model, tok = make_model(kind, dtype=dtype)
    shard_size = _shard_size(model) if sharded else None
    base = _save_hf(model, tok, tmp_path / "base", shard_size)
    assert len(list(base.glob("*.safetensors"))) == (3 if sharded else 1)
    delta = _delta(model)
    assert (min(len(delta.row_blocks(wd.name)) for wd in delta.weights) > 2) == blocks
    ref = _reference(base, delta, dtype, tmp_path / "ref", shard_size)
    assert delta.n_fixups > 0
    delta.save(tmp_path / "delta.safetensors")

    assert _delta_cli("apply", base, tmp_path / "delta.safetensors", tmp_path / "edited") == 0
    assert "wrote" in capsys.readouterr().out
    edited, original = _files(tmp_path / "edited"), _files(base)
    assert edited.keys() == original.keys()
    for name, data in edited.items():
        if name.endswith(".safetensors"):
            assert data == (ref / name).read_bytes(), name  # the very bytes save_pretrained writes
        else:
            assert data == original[name], name  # config, tokenizer, index: copied
    assert sum(edited[n] != original[n] for n in edited) == len({_shard_of(base, wd.name) for wd in delta.weights})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", **dtype_kwargs(dtype))
    assert EditDelta.load(tmp_path / "delta.safetensors").is_applied(reloaded)

    assert _delta_cli("revert", tmp_path / "edited", tmp_path / "delta.safetensors", tmp_path / "back") == 0
    assert _files(tmp_path / "back") == original


def _shard_of(path: Path, name: str) -> str:
    index = path / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"


@pytest.fixture
def applied(tmp_path):
    """A 3-shard GPT-2 checkpoint, a recorded delta, and the checkpoint with the delta applied."""
    model, tok = make_model("gpt2")
    base = _save_hf(model, tok, tmp_path / "base", _shard_size(model))
    delta = _delta(model)
    delta.record(model)
    delta.save(tmp_path / "delta.safetensors")
    assert _delta_cli("apply", base, tmp_path / "delta.safetensors", tmp_path / "edited") == 0
    return base, tmp_path / "delta.safetensors", tmp_path / "edited"


def _refused(capsys, argv_action, checkpoint, delta_file, out, pattern, *extra) -> None:
    listing = sorted(p.name for p in Path(out).parent.iterdir())
    capsys.readouterr()
    assert _delta_cli(argv_action, checkpoint, delta_file, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("massedit delta: error: ") and err.count("\n") == 1, err
    assert pattern in err, err
    assert sorted(p.name for p in Path(out).parent.iterdir()) == listing  # nothing written, no staging left


def test_refusals_before_writing_anything(applied, tmp_path, capsys):
    base, delta_file, edited = applied
    _refused(capsys, "apply", edited, delta_file, tmp_path / "twice", "already holds this delta's edited weights")
    _refused(capsys, "revert", base, delta_file, tmp_path / "unedited", "does not carry this delta")

    other, tok = make_model("gpt2", seed=7)
    other_dir = _save_hf(other, tok, tmp_path / "other", _shard_size(other))
    _refused(capsys, "apply", other_dir, delta_file, tmp_path / "o1", "matches neither the base nor the edited")
    _refused(capsys, "revert", other_dir, delta_file, tmp_path / "o2", "matches neither the base nor the edited")

    shutil.copytree(base, tmp_path / "reconfigured")
    config = json.loads((tmp_path / "reconfigured" / "config.json").read_text())
    config["n_positions"] *= 2
    (tmp_path / "reconfigured" / "config.json").write_text(json.dumps(config))
    _refused(capsys, "apply", tmp_path / "reconfigured", delta_file, tmp_path / "o3", "config hash")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    _refused(capsys, "apply", base, delta_file, tmp_path / "full", "not empty")
    assert _files(tmp_path / "full") == {"notes.txt": b"mine"}
    _refused(capsys, "apply", base, delta_file, base / "inside", "inside --checkpoint", "--force")


def test_in_place_with_force_swaps_the_directory_whole(applied, tmp_path, capsys):
    base, delta_file, edited = applied
    original, expected = _files(base), _files(edited)
    shutil.copytree(base, tmp_path / "work")
    _refused(capsys, "apply", tmp_path / "work", delta_file, tmp_path / "work", "not empty")
    assert _delta_cli("apply", tmp_path / "work", delta_file, tmp_path / "work", "--force") == 0
    assert _files(tmp_path / "work") == expected
    assert _delta_cli("revert", tmp_path / "work", delta_file, tmp_path / "work", "--force") == 0
    assert _files(tmp_path / "work") == original
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]


def test_failure_mid_write_leaves_the_checkpoint_as_it_was(applied, tmp_path, monkeypatch):
    import massedit.edits.checkpoint as checkpoint_mod

    base, delta_file, _ = applied
    shutil.copytree(base, tmp_path / "work")
    original = _files(tmp_path / "work")
    write_shard, calls = checkpoint_mod._write_shard, []

    def dies_on_the_second_shard(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C would, after one shard was written
        write_shard(*args)

    monkeypatch.setattr(checkpoint_mod, "_write_shard", dies_on_the_second_shard)
    assert _delta_cli("apply", tmp_path / "work", delta_file, tmp_path / "work", "--force") == 130
    calls.clear()
    assert _delta_cli("apply", base, delta_file, tmp_path / "new") == 130
    assert _files(tmp_path / "work") == original and not (tmp_path / "new").exists()
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]


def test_refusals_of_the_library(applied, tmp_path, monkeypatch):
    base, delta_file, edited = applied
    model, _ = make_model("gpt2")
    with pytest.raises(CheckpointError, match="no apply record"):
        prepare(edited, _delta(model), revert=True)
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        prepare(tmp_path, EditDelta.load(delta_file))
    # Δ recomputed differently here than where the delta was made (another device or build):
    # the written checkpoint would not be the one the delta records, so nothing is.
    edited_value = EditDelta.edited_value
    monkeypatch.setattr(EditDelta, "edited_value",
                        lambda self, name, w, rows=None: edited_value(self, name, w, rows) * (1 + 2**-20))
    with pytest.raises(CheckpointError, match="does not reproduce the edited weights"):
        prepare(base, EditDelta.load(delta_file))


def test_checkpoint_of_links_like_a_hub_cache_snapshot(applied, tmp_path):
    base, delta_file, edited = applied
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshot").mkdir()
    for f in base.iterdir():
        shutil.copy(f, tmp_path / "blobs" / f.name)
        (tmp_path / "snapshot" / f.name).symlink_to(Path("..") / "blobs" / f.name)
    assert _delta_cli("apply", tmp_path / "snapshot", delta_file, tmp_path / "out") == 0
    assert _files(tmp_path / "out") == _files(edited)
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_delta_that_adds_parameters_is_refused(tmp_path):
    from massedit.edits.delta import ParameterAdditions

    model, tok = make_model("llama")
    base = _save_hf(model, tok, tmp_path / "base")
    delta = _delta(model)
    delta.additions = ParameterAdditions({"model.layers.0.self_attn.o_proj.bias": (32,)}, {"attention_bias": [False, True]})
    with pytest.raises(CheckpointError, match="adds 1 parameters"):
        prepare(base, delta)


# --- torch.distributed.checkpoint -------------------------------------------------------------

def _dcp_state(model, step: int, extra_copy: bool = False) -> dict:
    """What a training job saves: the model's state under "model", beside other state."""
    state = {"model": model.state_dict(), "step": step, "optim": {"lr": torch.tensor(1e-4)}}
    if extra_copy:
        state["ema"] = {k: v.clone() for k, v in model.state_dict().items()}
    return state


def _dcp_flat(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) if hasattr(m, "size") else None
             for k, m in metadata.state_dict_metadata.items()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state, metadata.planner_data


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype) if torch.is_tensor(a[k]) else a[k] == b[k], k


@pytest.mark.parametrize("kind,blocks", [("gpt2", False), ("llama", False), ("gpt2", True)])
def test_dcp_apply_is_load_apply_save_and_revert_restores(kind, blocks, tmp_path, monkeypatch):
    if blocks:  # each weight edited in place in many row blocks, as large ones are
        monkeypatch.setattr(delta_mod, "_CHUNK_BYTES", 8 * 64 * 5)
    model, _ = make_model(kind)
    dcp.save(_dcp_state(model, step=7), checkpoint_id=str(tmp_path / "base"), no_dist=True)
    (tmp_path / "base" / "trainer_state.json").write_text('{"global_step": 7}')
    delta = _delta(model)

    # Load, apply, save: the training job's own way round.
    job, _ = make_model(kind, seed=5)
    state = _dcp_state(job, step=0)
    dcp.load(state, checkpoint_id=str(tmp_path / "base"), no_dist=True)
    delta.apply(job)
    dcp.save(state, checkpoint_id=str(tmp_path / "ref"), no_dist=True)
    delta.save(tmp_path / "delta.safetensors")

    assert _delta_cli("apply", tmp_path / "base", tmp_path / "delta.safetensors", tmp_path / "edited") == 0
    (edited, edited_paths), (ref, ref_paths) = _dcp_flat(tmp_path / "edited"), _dcp_flat(tmp_path / "ref")
    _assert_same_state(edited, ref)
    assert edited_paths == ref_paths  # nested as the job saved it
    assert (tmp_path / "edited" / "trainer_state.json").read_text() == '{"global_step": 7}'

    _refused_lib(tmp_path / "edited", tmp_path / "delta.safetensors", False, "already holds")
    assert _delta_cli("revert", tmp_path / "edited", tmp_path / "delta.safetensors", tmp_path / "back") == 0
    _assert_same_state(_dcp_flat(tmp_path / "back")[0], _dcp_flat(tmp_path / "base")[0])
    _refused_lib(tmp_path / "base", tmp_path / "delta.safetensors", True, "does not carry this delta")


def _refused_lib(checkpoint, delta_file, revert, pattern) -> None:
    with pytest.raises(CheckpointError, match=pattern):
        prepare(checkpoint, EditDelta.load(delta_file), revert=revert)


def test_dcp_names_matched_by_suffix_only_when_unambiguous(tmp_path):
    model, _ = make_model("gpt2")
    delta = _delta(model)
    delta.record(model)
    dcp.save(_dcp_state(model, step=1, extra_copy=True), checkpoint_id=str(tmp_path / "two"), no_dist=True)
    with pytest.raises(CheckpointError, match="2 tensors end in .*ambiguous"):
        prepare(tmp_path / "two", delta)
    dcp.save({"module": model.state_dict()}, checkpoint_id=str(tmp_path / "ddp"), no_dist=True)
    edit = prepare(tmp_path / "ddp", delta)
    assert set(edit.tensor_names.values()) == {f"module.{wd.name}" for wd in delta.weights}


# --- memory -----------------------------------------------------------------------------------

_PEAK = textwrap.dedent(
    """
    import sys, torch
    from massedit.edits.checkpoint import prepare
    from massedit.edits.delta import EditDelta
    torch.set_num_threads(1)
    def kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
    checkpoint, delta = sys.argv[1], EditDelta.load(sys.argv[2])
    for action, out in (("apply", sys.argv[3]), ("revert", sys.argv[4])):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the present resident size
        before = kib("VmRSS")
        prepare(checkpoint, delta, revert=action == "revert").write(out)
        print(action, (kib("VmHWM") - before) * 1024)
        checkpoint = out
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak with Linux's VmHWM")
def test_peak_memory_is_about_one_weight(tmp_path, capsys):
    """A 128 MiB float32 weight (4,096 x 8,192: four of the delta's row blocks) in a 3-shard checkpoint,
    beside a 128 MiB tensor the delta leaves alone. Apply and revert each grow a fresh process by
    about the weight: one float64 block of Δ (64 MiB), one block of the weight's rows and its result
    (32 MiB each), the allocator's slack; never a whole weight, its result or a shard (holding the
    weight and its result took 4.9x for apply, 3.3x for revert). Also the multi-block case of "load,
    apply, save" bit for bit, fix-ups in every block, and revert giving the original bytes back."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    rows, cols = 4096, 8192
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.mlp = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        model.mlp.weight.copy_(torch.randn(rows, cols, generator=g))
    (tmp_path / "ckpt").mkdir()
    weight_map = {}
    for shard in range(3):
        file = f"model-{shard + 1:05d}-of-00003.safetensors"
        tensors = {f"other.{shard}.weight": torch.randn(64, 64, generator=g)}
        if shard == 1:
            tensors.update({"mlp.weight": model.mlp.weight.detach(), "frozen.weight": torch.zeros(rows, cols)})
        save_file(tensors, str(tmp_path / "ckpt" / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    delta = EditDelta([WeightDelta("mlp.weight", torch.randn(rows, 4, generator=g),
                                   torch.randn(cols, 4, generator=g) * 0.01)])
    assert len(delta.row_blocks("mlp.weight")) == 4
    delta.apply(model)  # records it: config-less checkpoints are recognised by the record's digests
    assert delta.n_fixups > 0
    delta.save(tmp_path / "delta.safetensors")
    (tmp_path / "edited").mkdir()
    (tmp_path / "back").mkdir()

    run = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "ckpt"), str(tmp_path / "delta.safetensors"),
                          str(tmp_path / "edited"), str(tmp_path / "back")], check=True, capture_output=True, text=True)
    peak = {action: int(n) for action, n in (line.split() for line in run.stdout.splitlines())}
    weight = rows * cols * 4
    with capsys.disabled():
        print("\npeak RSS growth for a 128 MiB weight: " + ", ".join(
            f"{action} {n / 2**20:.0f} MiB = {n / weight:.2f}x" for action, n in peak.items()))
    assert all(n < 2 * weight for n in peak.values()), peak

    with safe_open(str(tmp_path / "edited" / "model-00002-of-00003.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("mlp.weight").view(torch.int32), model.mlp.weight.detach().view(torch.int32))
    assert _files(tmp_path / "back") == _files(tmp_path / "ckpt")


def test_rows_outside_the_delta_row_blocks_are_refused():
    delta = EditDelta([WeightDelta("w", torch.randn(8, 2), torch.randn(4, 2))])
    assert delta.row_blocks("w") == [slice(0, 8)]
    with pytest.raises(DeltaError, match="not one of the delta's row blocks"):
        delta.edited_value("w", torch.zeros(3, 4), slice(0, 3))
