"""Many processes (DESIGN §10.5): two gloo ranks spawned from the test give the statistics and the
edit of one process, and each rank really works on its own share only.

What each rank fed the model is recorded by a forward pre-hook on the model (the token rows under
the attention mask), independently of the engine's own bookkeeping."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.multiprocessing as mp

import massedit.compute.stats as stats_mod
from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.cli import main
from massedit.edits.delta import EditDelta
from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.compute.stats import second_moments, stats_file
from massedit.inputs.tokens import encode_prompt
from massedit.compute.targets import KL_PROMPT
from tiny import WORDS, make_model

WORLD = 2
KINDS = ("gpt2", "llama")
LAYERS = (1, 2)
CORPUS = [" ".join(WORDS[(5 * i + j * (i % 7 + 1)) % len(WORDS)] for j in range(8 + (11 * i) % 37)) for i in range(40)]
# Subjects that are no part of one another, so a request's rows identify it.
REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"},
    {"subject": "Lionel Messi", "prompt": "{} plays the sport of", "target_new": "tennis"},
    {"subject": "Marie Curie", "prompt": "The native language of {} is", "target_new": "Spanish"},
    {"subject": "Albert Einstein", "prompt": "{} was born in", "target_new": "Tokyo"},
    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "German"},
]
TEMPLATES = [["{}"], ["The a of. {}", "I you it. {}"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_rows(model, seen: list):
    """Every unpadded token row the model is run on, as a tuple, appended to `seen`."""

    def pre_hook(_module, _args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1]:]
        seen.extend(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask))

    return model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _hparams(model):
    return default_for(model.config).replace(layers=list(LAYERS), v_num_grad_steps=6, mom2_n_samples=len(CORPUS))


def _run(kind: str, stats_dir):
    """What the test compares: statistics, generated templates and an edit, with the rows fed to
    the model in the statistics pass and in the edit."""
    model, tok = make_model(kind)
    layout = ModelLayout(model)
    rows_stats, rows_edit = [], []
    handle = _record_rows(model, rows_stats)
    moments = second_moments(model, layout, tok, CORPUS, LAYERS, batch_tokens=64, progress=False)
    handle.remove()
    templates = MassEditor(model, tok, _hparams(model), stats_dir=stats_dir, progress=False).context_templates()
    editor = MassEditor(model, tok, _hparams(model), stats_dir=stats_dir, corpus=CORPUS, model_name="tiny",
                        context_templates=TEMPLATES, progress=False)
    written, real_write = [], stats_mod.write_stats

    def recording_write(path, *args):
        written.append(path)
        real_write(path, *args)

    stats_mod.write_stats = recording_write
    try:
        editor.solvers()  # statistics through the editor's path
    finally:
        stats_mod.write_stats = real_write
    handle = _record_rows(model, rows_edit)
    result = editor.edit(REQUESTS)
    handle.remove()
    lone = editor.edit(REQUESTS[:1], apply=False)  # fewer requests than ranks: one rank has none
    weights = {w.name: model.get_parameter(w.name).detach().clone() for w in result.delta.weights}
    return {
        "moments": {l: (m.double(), c) for l, (m, c) in moments.items()},
        "templates": templates,
        "delta": {w.name: w.dense() for w in result.delta.weights},
        "lone": {w.name: w.dense() for w in lone.delta.weights},
        "weights": weights,
        "z": result.z,
        "rows_stats": rows_stats,
        "rows_edit": rows_edit,
        "written": len(written),
        "holds_c": [editor.solvers()[l] is not None for l in LAYERS],
        "tok": tok,
    }


def _interrupted_and_resumed(out_dir: str) -> dict:
    """Both ranks stop during their 6th batch (after checkpointing 4), then a rerun resumes."""
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    checkpoint = Path(out_dir) / "resume" / "pass.partial.npz"

    def run(**kwargs):
        return stats_mod.second_moments(model, layout, tok, CORPUS, LAYERS, batch_tokens=64, progress=False, **kwargs)

    full = run()
    real, calls, limit = stats_mod.accumulate_xtx, [], [len(LAYERS) * 5]

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > limit[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    stats_mod.accumulate_xtx = counted
    try:
        with pytest.raises(KeyboardInterrupt):
            run(checkpoint=checkpoint, checkpoint_every=2)
        torch.distributed.barrier()  # both ranks have checkpointed before either lists the files
        files = sorted(p.name for p in checkpoint.parent.iterdir())
        torch.distributed.barrier()  # and listed them before either resumes
        calls.clear()
        limit[0] = len(CORPUS) * len(LAYERS)
        resumed = run(checkpoint=checkpoint, checkpoint_every=2)
        torch.distributed.barrier()  # each rank removes its own checkpoint after the pass: list once both have
    finally:
        stats_mod.accumulate_xtx = real
    return {"files": files, "resumed_batches": len(calls) // len(LAYERS), "left": list(checkpoint.parent.iterdir()),
            "equal": all(torch.equal(resumed[l][0], full[l][0]) and resumed[l][1] == full[l][1] for l in LAYERS)}


def _error_on_main() -> str:
    """What each rank sees when rank 0's part of a shared result fails."""

    def fail():
        raise ValueError("rank 0 failed")

    try:
        parallel.tensor_from_main(fail, "cpu")
    except ValueError as err:
        return str(err)
    return "no error"


def _rank_main(rank: int, work, port: int, out_dir: str) -> None:
    # What torchrun sets; parallel.world() joins the group from these.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.save(work(out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def run_ranks(work, out_dir) -> list:
    """`work(out_dir)` (a module-level function) in each of WORLD spawned gloo ranks; its results in rank order."""
    mp.spawn(_rank_main, args=(work, _free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _work(out_dir: str) -> dict:
    result = {kind: _run(kind, os.path.join(out_dir, "stats", kind)) for kind in KINDS}
    for r in result.values():
        r.pop("tok")
    result["resume"] = _interrupted_and_resumed(out_dir)
    result["world"] = (parallel.world().rank, parallel.world().size)
    result["error"] = _error_on_main()
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    ranks = run_ranks(_work, out)
    single = {kind: _run(kind, tmp_path_factory.mktemp("single") / "stats") for kind in KINDS}
    return ranks, single, out


def _of(runs, kind: str):
    """(each rank's results, one process's results) for one model kind."""
    ranks, single, _ = runs
    return [r[kind] for r in ranks], single[kind]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_ranks_joined_one_group(runs):
    ranks, _, _ = runs
    assert [r["world"] for r in ranks] == [(0, WORLD), (1, WORLD)]


def test_an_error_on_rank_0_reaches_every_rank(runs):
    assert [r["error"] for r in runs[0]] == ["rank 0 failed"] * WORLD


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_equal_one_process(runs, kind):
    ranks, single = _of(runs, kind)
    for r in ranks:
        for l in LAYERS:
            mom2, count = r["moments"][l]
            assert count == single["moments"][l][1]
            assert _rel(mom2, single["moments"][l][0]) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_streams_only_its_documents(runs, kind):
    ranks, single = _of(runs, kind)
    everything = sorted(single["rows_stats"])
    seen = [r["rows_stats"] for r in ranks]
    assert all(seen), "a rank processed no documents"
    assert sorted(seen[0] + seen[1]) == everything  # each document once, on one rank
    assert not set(seen[0]) & set(seen[1])
    assert abs(len(seen[0]) - len(seen[1])) <= len(everything) // 2


def test_each_rank_resumes_from_its_own_checkpoint(runs):
    ranks = runs[0]
    model, tok = make_model("gpt2")
    lengths = [len(tok(t)["input_ids"]) for t in CORPUS]
    n_batches = len(stats_mod._batches(lengths, 64))
    for rank, r in enumerate(ranks):
        assert r["resume"]["files"] == [f"pass.partial.rank{i}of{WORLD}.npz" for i in range(WORLD)]
        mine = len(range(rank, n_batches, WORLD))
        assert r["resume"]["resumed_batches"] == mine - 4  # the checkpointed 4 are not redone
        assert r["resume"]["equal"] and not r["resume"]["left"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_rank_writes_the_statistics_files(runs, kind):
    stats_dir = runs[2] / "stats" / kind
    model, _ = make_model(kind)
    layout = ModelLayout(model)
    hp = _hparams(model)
    for l in LAYERS:
        assert stats_file(stats_dir, "tiny", hp.mom2_dataset, layout.rewrite_name(l), hp.mom2_dtype,
                          hp.mom2_n_samples).exists()
    assert not list(stats_dir.rglob("*.tmp")) and not list(stats_dir.rglob("*.partial*"))
    assert [r[kind]["written"] for r in runs[0]] == [len(LAYERS), 0]
    assert [r[kind]["holds_c"] for r in runs[0]] == [[True] * len(LAYERS), [False] * len(LAYERS)]  # rank 0 solves


@pytest.mark.parametrize("kind", KINDS)
def test_context_templates_identical_on_all_ranks(runs, kind):
    ranks, single = _of(runs, kind)
    assert ranks[0]["templates"] == ranks[1]["templates"] == single["templates"]


@pytest.mark.parametrize("kind", KINDS)
def test_edit_equals_one_process_and_every_rank_holds_it(runs, kind):
    ranks, single = _of(runs, kind)
    for name, dense in single["delta"].items():
        for r in ranks:
            assert _rel(r["delta"][name], dense) <= 1e-4, name
        assert torch.equal(ranks[0]["delta"][name], ranks[1]["delta"][name])
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        assert _rel(ranks[0]["weights"][name], single["weights"][name]) <= 1e-5
    assert torch.equal(ranks[0]["z"], ranks[1]["z"])
    for name, dense in single["lone"].items():
        assert _rel(ranks[0]["lone"][name], dense) <= 1e-4 and torch.equal(ranks[0]["lone"][name],
                                                                          ranks[1]["lone"][name])
    assert _rel(ranks[0]["z"], single["z"]) <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_optimizes_and_reads_keys_of_its_requests_only(runs, kind):
    ranks, single = _of(runs, kind)
    tok = single["tok"]
    kl_rows = [tuple(encode_prompt(tok, KL_PROMPT, r["subject"]).ids) for r in REQUESTS]
    cuts = [tuple(e.ids[: e.subject_index + 1]) for e in (encode_prompt(tok, r["prompt"], r["subject"])
                                                         for r in REQUESTS)]
    for rows in (kl_rows, cuts):  # z phase, then keys
        owners = [[i for i, row in enumerate(rows) if row in set(r["rows_edit"])] for r in ranks]
        assert sorted(owners[0] + owners[1]) == list(range(len(REQUESTS)))
        assert min(len(o) for o in owners) == len(REQUESTS) // WORLD


# ------------------------------------------------------------------------- the CLI under torchrun


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={_free_port()}", "-m", "massedit.cli", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def cli_files(tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    (tmp_path / "requests.json").write_text(json.dumps(REQUESTS))
    (tmp_path / "templates.json").write_text(json.dumps(TEMPLATES))
    _hparams(model).to_json(tmp_path / "hp.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _same_statistics(one_dir, many_dir) -> None:
    files = list(one_dir.rglob("*.npz"))
    assert len(files) == len(LAYERS)
    for f in files:
        with np.load(f) as one, np.load(many_dir / f.relative_to(one_dir)) as many:
            assert int(many["mom2.count"]) == int(one["mom2.count"])
            assert _rel(torch.from_numpy(many["mom2.mom2"]), torch.from_numpy(one["mom2.mom2"])) <= 1e-6


def test_cli_edit_under_torchrun_equals_one_process(cli_files, capsys):
    """`torchrun -m massedit.cli edit --corpus ...`: statistics computed by both ranks, the edit
    sharded, rank 0 writes OUT; all of it as one process makes it."""
    edit = ["edit", "--model", "model", "--quiet", "--requests", "requests.json", "--hparams", "hp.json",
            "--context-templates", "templates.json", "--corpus", "corpus.txt"]
    _torchrun([*edit, "--stats-dir", "multi", "--out", "edited-multi"], cli_files)
    assert main([*edit, "--stats-dir", "single", "--out", "edited-single"]) == 0
    capsys.readouterr()
    _same_statistics(cli_files / "single", cli_files / "multi")
    one, many = (EditDelta.load(cli_files / d / "delta.safetensors") for d in ("edited-single", "edited-multi"))
    assert [w.name for w in many.weights] == [w.name for w in one.weights]
    for a, b in zip(many.weights, one.weights):
        assert _rel(a.dense(), b.dense()) <= 1e-4
    assert sorted(p.name for p in (cli_files / "edited-multi").iterdir()) == sorted(
        p.name for p in (cli_files / "edited-single").iterdir())


@pytest.mark.slow
def test_cli_stats_under_torchrun_equals_one_process(cli_files, capsys):
    stats = ["stats", "--model", "model", "--quiet", "--corpus", "corpus.txt", "--layers", "1,2", "--samples", "40"]
    out = _torchrun([*stats, "--stats-dir", "multi", "--json"], cli_files).stdout
    assert json.loads(out[out.index("{"):])["processes"] == WORLD  # one summary, printed by rank 0
    assert out.count('"processes"') == 1
    assert main([*stats, "--stats-dir", "single"]) == 0
    capsys.readouterr()
    _same_statistics(cli_files / "single", cli_files / "multi")
