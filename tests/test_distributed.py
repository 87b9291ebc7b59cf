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


@pytest.mark.parametrize("model", ["pyg_gcn-auto", "appnp-auto", "gat-auto", "pyg_gcn-reference"])
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
    for way in (0, 1):  # candidates above a sampled pivot, or from torch.topk
        assert torch.equal(single["top_k"][k][way][0], want) and float(single["top_k"][k][way][1]) == float(threshold)
        got = torch.sort(torch.cat([r["top_k"][k][way][0] for r in ranks])).values
        assert torch.equal(got, want)
        assert all(float(r["top_k"][k][way][1]) == float(threshold) for r in ranks)


def test_study_shares_its_cells_and_resumes_after_a_rank_dies(tmp_path):
    """``run_study`` on two ranks: each rank runs the cells of its models; when rank 1 dies after
    its first cell the run fails, the finished cells stay, and a second run on two ranks runs
    only the rest and writes the complete report (rank 0)."""
    import json

    from fastmetamer.study.config import cells, quick_config

    job = Path(__file__).resolve().parent / "distributed" / "study_job.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job),
                str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    died = subprocess.run(torchrun + ["1"], capture_output=True, text=True, env=env, timeout=900)
    assert died.returncode != 0
    first = {f.stem: f.stat().st_mtime_ns for f in (tmp_path / "cells").glob("*.json")}
    ran_first = json.loads((tmp_path / "ran-rank1.json").read_text())
    assert len(ran_first) == 1 and ran_first[0] in first and not (tmp_path / "study.md").exists()
    done = subprocess.run(torchrun + ["-1"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = [json.loads((tmp_path / f"ran-rank{r}.json").read_text()) for r in (0, 1)]
    study = json.loads((tmp_path / "config.json").read_text())
    keys = [c.key for c in cells(quick_config(datasets=("synthetic",), architectures=("gcn",),
                                              mitigations=("none",), targets=4, steps=40))]
    assert study["datasets"] == ["synthetic"] and len(keys) >= 4
    assert sorted(ran[0] + ran[1]) == sorted(set(keys) - set(first))  # the rest, each cell once
    assert not set(ran[0]) & set(ran[1])
    assert all(json.loads((tmp_path / "cells" / f"{k}.json").read_text())["status"] == "ok" for k in keys)
    assert all((tmp_path / "cells" / f"{k}.json").stat().st_mtime_ns == t for k, t in first.items())
    assert f"cells: {len(keys)} ok" in (tmp_path / "study.md").read_text()


def test_two_ranks_share_a_batch_of_graphs_and_return_the_single_process_metamers(runs):
    """A PyG batch of 7 graphs (graph-level metamers at a pooled readout) on two ranks: each rank
    solves a run of the graphs, and every rank returns the single process's metamers."""
    single, ranks = runs
    want = single["graphs"]
    assert want["loss"].shape == (7,) and torch.equal(want["center"], torch.arange(7))
    for got in (r["graphs"] for r in ranks):
        for name in ("x", "n_id", "center", "batch", "passed", "trivial"):
            assert torch.equal(got[name], want[name]), name
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["history"], want["history"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["null_threshold"], want["null_threshold"])
        assert got["metrics"]["activation"]["cosine"] == pytest.approx(want["metrics"]["activation"]["cosine"])


def _awkward_graph(n: int, seed: int) -> torch.Tensor:
    """Random edges [2, E] with self loops, duplicates, a hub and isolated nodes (the last 3)."""
    gen = torch.Generator().manual_seed(seed)
    edges = torch.randint(0, n - 3, (2, 4 * n), generator=gen)
    hub = torch.stack([torch.arange(n - 3), torch.zeros(n - 3, dtype=torch.long)])
    loops = torch.arange(0, n - 3, 5).repeat(2, 1)
    return torch.cat([edges, edges[:, :7], hub, loops], 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_parts_own_every_node_once_and_hold_what_their_layers_read(world):
    """Every node is owned by one rank; a part's halo is exactly the outside in-neighbours of its
    owned nodes, its edges every edge into owned or halo nodes, and an exchange built from the
    owners' boundary blocks puts each halo node's own row in its place."""
    from fastmetamer.graph.partition import build_part, owners

    n = 60
    edge_index = _awkward_graph(n, world)
    owner = owners(edge_index, n, world)
    parts = [build_part(edge_index, owner, r, world) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat([p.owned for p in parts])).values, torch.arange(n))
    rows = torch.randn(n, 3)
    blocks = torch.zeros(world * parts[0].width, 3)
    for p in parts:  # what all_gather assembles: each rank's boundary rows in its block
        blocks[p.rank * p.width:p.rank * p.width + p.send_rows.numel()] = rows[p.nodes[p.send_rows]]
    src, dst = edge_index
    for p in parts:
        mine = owner == p.rank
        halo = torch.unique(src[mine[dst] & ~mine[src]])
        assert torch.equal(p.nodes[p.num_owned:p.num_owned + p.num_halo], halo)
        inner = mine.clone()
        inner[halo] = True
        assert torch.equal(p.edges, inner[dst].nonzero().flatten())
        assert torch.equal(p.nodes[p.edge_index], edge_index[:, p.edges])
        assert torch.equal(blocks[p.halo_slot], rows[halo])


def test_locality_order_cuts_a_shuffled_ring_into_runs_with_a_small_halo():
    """On a ring whose node ids are shuffled, the reverse Cuthill-McKee order finds the ring:
    two parts share only the few nodes around their two cuts."""
    from fastmetamer.graph.partition import build_part, owners

    n = 400
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    edge_index = ids[torch.cat([ring, ring.flip(0)], 1)]
    owner = owners(edge_index, n, 2)
    assert torch.bincount(owner).tolist() == [200, 200]
    assert all(build_part(edge_index, owner, r, 2).num_halo <= 4 for r in (0, 1))
