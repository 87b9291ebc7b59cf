"""GPU validation in one command: build the CUDA library, run the GPU tests, memcheck a small
``generate``, and measure fastmetamer against PyG on the same GPU.

    python benchmarks/gpu_check.py [--root DATA] [--out benchmarks/results] [--small] [--device cuda]

Needs a machine with a GPU and a CUDA build of torch, and no network. Beyond torch it uses
``torch_geometric``, ``triton``, ``scipy``, ``pytest``, ``hypothesis`` (fastmetamer's own
dependencies and test extras), ``nvcc`` and ``compute-sanitizer`` (CUDA toolkit); it checks for
them first and stops naming what is missing. Steps, each timed:

1. ``build``: ``csrc/cuda`` compiled by nvcc for this GPU's architecture (``FASTMETAMER_CUDA_LIB``
   points the tests at it).
2. ``tests``: ``pytest -m "cuda or triton" tests/cuda tests/triton`` with Triton compiled for the
   GPU: every cuda and triton op and gradient against the float64 reference on awkward graphs, the
   engine and ``generate`` on the GPU against the cpu backend, device placement.
3. ``memcheck``: ``compute-sanitizer --tool memcheck`` over a small ``generate`` on the cuda backend.
4. benchmarks, written to ``gpu.json`` and ``gpu.md``:
   - ``products_step``: a whole-graph feature metamer of a random graph of ogbn-products' size
     (2,449,029 nodes, ~124 M directed edges, F = 100 binary), PyG ``GCN`` (2 layers, hidden 256),
     per step and per call, against the PyG loop (``pyg_baseline.feature_metamer``), with peak
     GPU memory of each;
   - ``aggregation``: the cuda ``aggregate_forward`` (ReLU epilogue) over that graph with 256
     features: effective bandwidth on the byte model (8 B col + 4 B weight + 4f B gathered row per
     entry, 4f B written + f/8 B of mask per row, 8 B rowptr per row) against the GPU's copy
     bandwidth measured by a large ``copy_``;
   - ``cora_10k``: 10,000 node metamers of 1,000 steps (all 2,708 Cora nodes under 4 seeds, or a
     Cora-shaped synthetic graph when the data folder is absent; said in the result);
   - ``dimension_2m``: the metamer dimension of every node of a 2.4 M-node random graph (in-degree
     5, F = 16, GCN 2 layers, hidden 16).

``--small`` shrinks every size (a dry run of the script, e.g. on a CPU with ``--device cpu``,
where the GPU-only steps report themselves skipped).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

PACKAGES = ("torch_geometric", "triton", "scipy", "pytest", "hypothesis")
TOOLS = ("nvcc", "compute-sanitizer")
SIZES = {  # name: (full, small)
    "products_nodes": (2_449_029, 20_000), "products_degree": (50.6, 10.0),
    "dimension_nodes": (2_400_000, 5_000), "metamers": (10_000, 200), "metamer_steps": (1_000, 20),
    "products_steps": (20, 3),
}
MEMCHECK = ("import torch, fastmetamer as fm\n"
            "from fastmetamer.datasets import synthetic_graph\n"
            "g = synthetic_graph(num_nodes=60, num_features=16).to('cuda')\n"
            "m = fm.models.build_model('gcn', 16, 3, hidden=16).to('cuda').eval()\n"
            "fm.generate(m, g, [1, 2, 3], steps=10, backend='cuda')\n"
            "fm.generate(m, g, [1, 2], kind='structure', steps=5, backend='cuda')\n")


def missing_requirements(device: str) -> list[str]:
    """What this check needs and this machine lacks (empty when all is there)."""
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if device == "cuda":
        missing += [t for t in TOOLS if shutil.which(t) is None]
        if not torch.cuda.is_available():
            missing.append("a GPU visible to torch (torch.cuda.is_available() is False; "
                           f"torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return missing


def timed(name: str, steps: dict, function, *args):
    """Run ``function(*args)``, record its outcome and seconds under ``steps[name]``."""
    started = time.perf_counter()
    try:
        outcome = function(*args)
        status = "ok"
    except Exception as err:  # a failed step is reported, the others still run
        outcome, status = f"{type(err).__name__}: {err}", "failed"
    steps[name] = {"status": status, "seconds": round(time.perf_counter() - started, 2), "result": outcome}
    print(f"[{name}] {status} in {steps[name]['seconds']} s", flush=True)
    return outcome


def build_library(library: Path) -> str:
    from fastmetamer.ops import cuda_library

    major, minor = torch.cuda.get_device_capability()
    cuda_library.build(f"sm_{major}{minor}", library, jobs=os.cpu_count() or 2)
    return f"{library} (sm_{major}{minor})"


def run_command(command: list[str], env: dict, limit: float) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: " + " | ".join(tail))
    return " | ".join(tail)


def peak_memory_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_graph(n: int, degree: float, features: int, device: str, seed: int = 0):
    """A random directed graph (``degree`` n edges) with binary features [n, features] (5% ones)."""
    from torch_geometric.data import Data

    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, features, generator=gen) < 0.05).float()
    return Data(x=x, edge_index=torch.randint(0, n, (2, int(degree * n)), generator=gen)).to(device)


def gcn(in_channels: int, hidden: int, out: int, device: str):
    from torch_geometric.nn import GCN

    torch.manual_seed(0)
    return GCN(in_channels, hidden, num_layers=2, out_channels=out).to(device).eval()


def products_step(device: str, small: bool, backend: str) -> dict:
    """Whole-graph metamer steps of fastmetamer and of the PyG loop on the same graph and GPU."""
    import fastmetamer as fm
    from pyg_baseline import feature_metamer

    graph = random_graph(SIZES["products_nodes"][small], SIZES["products_degree"][small], 100, device)
    model, steps = gcn(100, 256, 64, device), SIZES["products_steps"][small]
    row = {"nodes": graph.num_nodes, "edges": graph.num_edges, "steps": steps, "model": "PyG GCN 2x256"}
    reset_peak(device)
    started = time.perf_counter()
    res = fm.generate(model, graph, None, steps=steps, backend=backend, progress=False)
    synchronize(device)
    row.update(fastmetamer_call_s=time.perf_counter() - started, fastmetamer_step_s=res.seconds / steps,
               fastmetamer_peak_gb=peak_memory_gb(device))
    reset_peak(device)
    started = time.perf_counter()
    feature_metamer(model, graph.x, graph.edge_index, None, steps)
    synchronize(device)
    row.update(pyg_step_s=(time.perf_counter() - started) / steps, pyg_peak_gb=peak_memory_gb(device))
    row["step_speedup"] = row["pyg_step_s"] / row["fastmetamer_step_s"]
    if device == "cuda":
        row["memory_ratio"] = row["fastmetamer_peak_gb"] / row["pyg_peak_gb"]
    return row


def aggregation(device: str, small: bool, backend: str) -> dict:
    """Bandwidth of one fused aggregation against the byte model and the device's copy bandwidth."""
    from fastmetamer.ops import dispatch

    n, f = SIZES["products_nodes"][small], 256
    graph = random_graph(n, SIZES["products_degree"][small], 1, device)
    rowptr, order = dispatch.group_by(graph.edge_index[1].contiguous(), n)
    col = graph.edge_index[0][order].contiguous()
    weight = torch.rand(col.numel(), device=device)
    x = torch.randn(n, f, device=device)
    ops = dispatch.get("aggregate", backend)
    seconds = _best_of(lambda: ops.aggregate_forward(rowptr, col, weight, x, None, "relu"), device)
    entries = col.numel()
    moved = entries * (8 + 4 + 4 * f) + n * (4 * f + f // 8 + 8)
    source = torch.empty(1 << 29 if not small else 1 << 22, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_s = _best_of(lambda: target.copy_(source), device)
    copy_gbs = 2 * source.numel() * 4 / copy_s / 1e9
    return {"nodes": n, "entries": entries, "features": f, "seconds": seconds, "bytes": moved,
            "gb_per_s": moved / seconds / 1e9, "copy_gb_per_s": copy_gbs,
            "share_of_copy": moved / seconds / 1e9 / copy_gbs}


def _best_of(function, device: str, repeats: int = 5) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def cora_metamers(device: str, small: bool, backend: str, root: str | None) -> dict:
    """``SIZES["metamers"]`` node metamers: every node of Cora under as many seeds as needed."""
    import fastmetamer as fm
    from fastmetamer.datasets import synthetic_graph

    try:
        graph, source = fm.datasets.load("Cora", root=root), "Cora"
    except Exception:  # no data folder on this machine
        graph = synthetic_graph(num_nodes=2708, num_features=1433)
        source = "Cora-shaped synthetic graph (2,708 nodes, 1,433 features; Cora not found)"
    graph = graph.to(device)
    model = fm.models.build_model("gcn", graph.num_features, int(graph.y.max()) + 1, hidden=64).to(device).eval()
    nodes = list(range(graph.num_nodes))
    wanted, steps = SIZES["metamers"][small], SIZES["metamer_steps"][small]
    seeds = -(-wanted // len(nodes))
    started, passed, count = time.perf_counter(), 0, 0
    for seed in range(seeds):
        take = nodes[: min(len(nodes), wanted - count)]
        res = fm.generate(model, graph, take, steps=steps, seed=seed, backend=backend, progress=False,
                          scores=False)
        passed += int(res.passed.sum())
        count += len(take)
    synchronize(device)
    return {"graph": source, "metamers": count, "steps": steps, "seconds": time.perf_counter() - started,
            "pass_rate": passed / count}


def dimension_all_nodes(device: str, small: bool) -> dict:
    """The metamer dimension of every node of a large random graph."""
    import fastmetamer as fm

    graph = random_graph(SIZES["dimension_nodes"][small], 5.0, 16, device)
    model = gcn(16, 16, 16, device)
    started = time.perf_counter()
    result = fm.metamer_dimension(model, graph)
    synchronize(device)
    return {"nodes": graph.num_nodes, "edges": graph.num_edges, "seconds": time.perf_counter() - started,
            "mean_dimension": float(result.dimension.double().mean())}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    return f"CPU only ({os.cpu_count()} cores), torch {torch.__version__}"


def markdown(report: dict) -> str:
    lines = [f"# GPU check\n\nMachine: {report['machine']}. Backend: {report['backend']}.\n",
             "| step | status | seconds | result |", "|---|---|---:|---|"]
    for name, step in report["steps"].items():
        result = step["result"]
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()) \
            if isinstance(result, dict) else str(result)
        lines.append(f"| {name} | {step['status']} | {step['seconds']} | {text} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("FASTMETAMER_DATA"), help="data folder with Cora")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where gpu.json and gpu.md go")
    parser.add_argument("--small", action="store_true", help="shrink every size (a dry run)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    missing = missing_requirements(args.device)
    if missing:
        print("gpu_check needs: " + "; ".join(missing), file=sys.stderr)
        return 2
    gpu = args.device == "cuda"
    backend = "cuda" if gpu else "cpu"
    library = ROOT / "build" / "gpu-check" / "libfastmetamer_cuda.so"
    os.environ["FASTMETAMER_CUDA_LIB"] = str(library)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    steps: dict = {}
    if gpu:
        timed("build", steps, build_library, library)
        timed("tests", steps, run_command, [sys.executable, "-m", "pytest", "-q", "-x", "-m", "cuda or triton",
                                            "tests/cuda", "tests/triton"], env, 240)
        timed("memcheck", steps, run_command, ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                                               sys.executable, "-c", MEMCHECK], env, 120)
    timed("products_step", steps, products_step, args.device, args.small, backend)
    timed("aggregation", steps, aggregation, args.device, args.small, backend)
    timed("cora_10k", steps, cora_metamers, args.device, args.small, backend, args.root)
    timed("dimension_2m", steps, dimension_all_nodes, args.device, args.small)
    report = {"machine": machine(args.device), "backend": backend, "small": args.small, "steps": steps}
    name = "gpu" if gpu and not args.small else f"gpu_dry_run_{args.device}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
