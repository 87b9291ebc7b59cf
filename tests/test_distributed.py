"""Scale-out (SPEC §10): targets shared across the ranks of a gloo process group give every rank
the single-process result; the sharing itself is balanced and covers every target once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmetamer import distributed

JOB = Path(__file__).resolve().parent / "distributed" / "job.py"


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_share_covers_every_item_once_in_balanced_runs(parts):
    gen = torch.Generator().manual_seed(parts)
    costs = torch.randint(1, 1000, (50,), generator=gen)
    costs[10] = 20_000  # one item heavier than an even share
    sizes = distributed.share(costs, parts)
    assert len(sizes) == parts and sum(sizes) == costs.numel()
    sums = torch.stack([run.sum() for run in costs.split(sizes)]) if parts > 1 else costs.sum()[None]
    # a run exceeds the even share by at most the item that straddles its end
    assert int(sums.max()) <= int(costs.sum()) / parts + int(costs.max())


def test_share_of_few_or_free_items():
    # midpoints 2.5 and 7.5 of the line [0, 10) cut into four: pieces 1 and 3
    assert distributed.share(torch.tensor([5, 5]), 4) == [0, 1, 0, 1]
    assert distributed.share(torch.zeros(4, dtype=torch.long), 2) == [2, 2]  # no cost: by count
    assert distributed.share(torch.zeros(0, dtype=torch.long), 3) == [0, 0, 0]
    with pytest.raises(ValueError, match=">= 0"):
        distributed.share(torch.tensor([1, -1]), 2)


def test_outside_a_process_group_nothing_is_shared():
    assert distributed.world() == (0, 1) and not distributed.is_sharing() and distributed.is_main_rank()
    assert distributed.my_share(torch.tensor([3, 1, 2])) == slice(0, 3)
    assert distributed.all_gather("part") == ["part"]


def _run(command: list[str], out: Path) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + [str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The job alone, then on two gloo ranks (torchrun): what each rank returned."""
    root = tmp_path_factory.mktemp("distributed")
    _run([sys.executable, str(JOB)], root / "single")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB)],
         root / "ranks")
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return load(root / "single" / "rank0.pt"), [load(root / "ranks" / f"rank{r}.pt") for r in (0, 1)]


def test_each_rank_solves_its_share_alone(runs):
    """Every target is solved on exactly one rank, each rank solving some (the single process
    solves them all)."""
    single, ranks = runs
    for job, count in (("generate", 2 * 9), ("dimension", 2 * 16)):
        everything = sorted(t for call in single["solved"][job] for t in call)
        per_rank = [sorted(t for call in r["solved"][job] for t in call) for r in ranks]
        assert len(everything) == count and all(0 < len(mine) < count for mine in per_rank), job
        assert sorted(per_rank[0] + per_rank[1]) == everything, job


@pytest.mark.parametrize("kind", ["features", "structure"])
def test_two_ranks_return_the_single_process_metamers(runs, kind):
    single, ranks = runs
    want = single[kind]
    assert want["loss"].numel() == 9 and not bool(want["trivial"].all())
    for got in (r[kind] for r in ranks):
        assert got["nodes"] == want["nodes"] and torch.equal(got["center"], want["center"])
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["edge_index"], want["edge_index"])
        if want["edge_weight"] is not None:
            assert torch.equal(got["edge_weight"], want["edge_weight"])
        assert torch.allclose(got["loss"], want["loss"], rtol=1e-4, atol=1e-12)
        assert torch.allclose(got["history"], want["history"], rtol=1e-4, atol=1e-12)
        assert torch.equal(got["passed"], want["passed"]) and torch.equal(got["trivial"], want["trivial"])


@pytest.mark.parametrize("wrt", ["features", "edges"])
def test_two_ranks_return_the_single_process_dimensions(runs, wrt):
    single, ranks = runs
    want = single["dimension_" + wrt]
    assert bool((want["rank"] > 0).all())
    for got in (r["dimension_" + wrt] for r in ranks):
        for name in ("rank", "input_dim", "log_volume", "nodes"):
            assert torch.equal(got[name], want[name]), name
        assert all(torch.equal(a, b) for a, b in zip(got["singular_values"], want["singular_values"]))


def test_command_line_under_torchrun_writes_the_single_process_outputs(tmp_path):
    """``fastmetamer generate`` and ``dimension`` started by torchrun on two ranks: rank 0 writes
    what one process writes (metamers, losses, dimensions)."""
    import json

    from fastmetamer import MetamerResult
    from fastmetamer.cli.main import main

    checkpoint = tmp_path / "gcn.pt"
    assert main(["--threads", "1", "train", "--model", "gcn", "--epochs", "5", "--hidden", "16",
                 "--out", str(checkpoint)]) == 0
    jobs = {"generate": ["--nodes", "3", "5", "40", "--steps", "15"], "dimension": ["--nodes", "3", "5", "40", "41"]}
    for name, args in jobs.items():
        command = [name, "--checkpoint", str(checkpoint), *args]
        assert main(["--threads", "1", *command, "--out", str(tmp_path / f"{name}-single")]) == 0
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "fastmetamer.cli", "--threads", "1", *command, "--out", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    single, shared = (MetamerResult.load(tmp_path / f / "metamer_features.pt") for f in ("generate-single", "generate"))
    assert shared.nodes == single.nodes == [3, 5, 40] and torch.equal(shared.graph.x, single.graph.x)
    assert torch.allclose(shared.loss, single.loss, rtol=1e-4)
    load = lambda folder: json.loads((tmp_path / folder / "dimension.json").read_text())  # noqa: E731
    want, got = load("dimension-single"), load("dimension")
    assert got["rank"] == want["rank"] and got["nodes"] == want["nodes"] == [3, 5, 40, 41]


def test_study_refuses_to_run_on_several_ranks(monkeypatch, capsys):
    from fastmetamer.cli.main import main

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    assert main(["study", "--quick", "--out", "unused"]) == 2
    assert "does not share its cells" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["pyg_gcn", "appnp", "gat"])
def test_two_ranks_partition_a_whole_graph_and_return_the_single_process_metamer(runs, model):
    """A whole-graph feature metamer on two ranks (each owning half the nodes and a halo) follows
    the single process's optimisation: continuous features within float tolerance all along;
    binary ones from the same start (the straight-through selection may then flip an entry on
    a rounding difference, after which the runs are different draws of the same search)."""
    single, ranks = runs
    for binary in (False, True):
        want = single["whole"][model, binary]
        assert want["partition"] is None and want["history"][-1] < 0.5 * want["history"][0]
        for got in (r["whole"][model, binary] for r in ranks):
            parts = got["partition"]
            assert parts["ranks"] == 2 and sum(parts["owned_rows"]) == 600 and min(parts["halo_rows"]) > 0
            assert got["x"].shape == want["x"].shape and not bool(got["trivial"].any())
            if binary:
                assert torch.allclose(got["history"][0], want["history"][0], rtol=1e-5)
                assert int(got["x"].sum()) == int(want["x"].sum())  # top-rho keeps the number of ones
                assert got["loss"] < 0.5 * float(got["history"][0]) and got["loss"] < 2 * want["loss"]
            else:
                assert got["history"].shape == want["history"].shape
                assert torch.allclose(got["history"], want["history"], rtol=1e-3)
                assert torch.allclose(got["x"], want["x"], atol=1e-3)
                assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
                assert torch.equal(got["passed"], want["passed"])
    assert ranks[0]["whole"][model, True]["history"].equal(ranks[1]["whole"][model, True]["history"])


@pytest.mark.parametrize("k", [0, 1, 17, 250, 499, 500])
def test_distributed_top_k_selects_what_one_stable_sort_selects(runs, k):
    """The top-k of values spread over the ranks (many ties) is the single process's stable
    descending sort's, ties to the smaller position, with the same threshold on every rank."""
    from fastmetamer.metamers.features import _flat_top_mask

    values = torch.randint(0, 40, (100, 5), generator=torch.Generator().manual_seed(5)).float() / 40
    hard, threshold = _flat_top_mask(values, k)
    want = hard.reshape(-1).nonzero().flatten()
    single, ranks = runs
    assert torch.equal(single["top_k"][k][0], want) and float(single["top_k"][k][1]) == float(threshold)
    got = torch.sort(torch.cat([r["top_k"][k][0] for r in ranks])).values
    assert torch.equal(got, want)
    assert all(float(r["top_k"][k][1]) == float(threshold) for r in ranks)
