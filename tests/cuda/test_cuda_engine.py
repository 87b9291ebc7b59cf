"""The whole pipeline on a GPU (skipped without one): ``generate`` and ``metamer_dimension`` with
the graph and the model on CUDA, on the ``cuda`` and ``triton`` backends, against the cpu (or
reference) backend on the CPU, and where their outputs live."""
from __future__ import annotations

import pytest
import torch

import fastmetamer as fm
from fastmetamer.ops import cuda_library, dispatch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

CPU_BACKEND = "cpu" if dispatch.is_available("cpu") else "reference"


def _backend_or_skip(backend: str) -> str:
    if backend == "cuda" and not cuda_library.available():
        pytest.skip("the CUDA library is not built (python fastmetamer/ops/cuda_library.py)")
    if not dispatch.is_available(backend):
        pytest.skip(f"backend {backend} is not available here")
    return backend


@pytest.fixture(scope="module")
def problem():
    graph = fm.datasets.synthetic_graph(num_nodes=400, num_features=64, seed=2)
    model = fm.models.build_model("gcn", 64, int(graph.y.max()) + 1, hidden=32).eval()
    return model, graph


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["features", "structure"])
def test_generate_on_the_gpu_follows_the_cpu(problem, backend, kind):
    model, graph = problem
    backend = _backend_or_skip(backend)
    on_cpu = fm.generate(model, graph, [11, 120, 300], kind=kind, steps=20, backend=CPU_BACKEND,
                         refine_steps=0, scores=False)
    on_gpu = fm.generate(model.cuda(), graph.cuda(), [11, 120, 300], kind=kind, steps=20, backend=backend,
                         refine_steps=0, scores=False)
    model.cpu()
    first = slice(0, 10)
    torch.testing.assert_close(on_gpu.history[first].cpu(), on_cpu.history[first], rtol=1e-3, atol=1e-7)
    assert on_gpu.graph.x.device.type == "cuda"
    assert on_gpu.passed.device.type == "cuda"


def test_whole_graph_and_dimension_on_the_gpu(problem):
    model, graph = problem
    backend = _backend_or_skip("cuda")
    gpu_model, gpu_graph = model.cuda(), graph.cuda()
    res = fm.generate(gpu_model, gpu_graph, None, steps=10, backend=backend)
    assert res.graph.x.device.type == "cuda" and torch.isfinite(res.history).all()
    on_gpu = fm.metamer_dimension(gpu_model, gpu_graph, [3, 50, 399])
    model.cpu()
    on_cpu = fm.metamer_dimension(model, graph, [3, 50, 399])
    assert torch.equal(on_gpu.rank.cpu(), on_cpu.rank)
    torch.testing.assert_close(on_gpu.log_volume.cpu(), on_cpu.log_volume, rtol=1e-6, atol=1e-9)


def test_the_step_loop_reads_the_device_every_k_steps(problem):
    """On a GPU the loop reads its flags every 16 steps by default; the result equals reading
    them every step (no restarts)."""
    model, graph = problem
    backend = _backend_or_skip("cuda")
    args = (model.cuda(), graph.cuda(), [11, 120])
    runs = [fm.generate(*args, steps=40, backend=backend, restart_patience=None, sync_every=every)
            for every in (1, None)]
    model.cpu()
    assert torch.equal(runs[0].history, runs[1].history)
    assert torch.equal(runs[0].graph.x, runs[1].graph.x)


def test_a_cpu_model_with_a_gpu_graph_is_a_clear_error(problem):
    model, graph = problem
    with pytest.raises(ValueError, match="device"):
        fm.generate(model, graph.cuda(), [1], steps=2)
