"""End to end on the Triton backend: ``fm.generate(..., backend="triton")`` follows the cpu
backend's trajectory (first 10 losses within 1e-3 relative) with every op family (aggregate, loss,
update) running on Triton, no other backend's op called and no fallback warning.

Run in its own process: ``TRITON_INTERPRET=1 python -m pytest -m triton tests/triton`` (the
interpreter must be selected before triton is imported), or on a machine with a CUDA device.
"""
import os
import warnings
from collections import Counter

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("triton tests need a CUDA device or TRITON_INTERPRET=1 (in their own process)",
                allow_module_level=True)
pytest.importorskip("triton")

from torch_geometric.nn import models  # noqa: E402

import fastmetamer as fm  # noqa: E402
from conftest import train_node_classifier  # noqa: E402
from fastmetamer.ops import dispatch  # noqa: E402

pytestmark = pytest.mark.triton

FAMILIES = ("aggregate", "loss", "update")
# the op entry points of the families (their reference.py contracts)
OPS = ("aggregate_forward", "aggregate_backward", "aggregate_tangents", "edge_grad", "propagate_forward",
       "matched_loss", "top_mask", "top_mask_csr", "adam_ste_update")
BASELINE = "cpu" if dispatch.is_available("cpu") else "reference"
OPTIONS = dict(steps=10, refine_steps=0, scores=False, progress=False)


def _spy(monkeypatch) -> Counter:
    """Count the calls of every backend's op entry points, keyed (backend, family)."""
    calls = Counter()
    for backend in dispatch.BACKENDS:
        for family in FAMILIES:
            module = dispatch._module(family, backend)
            for name in OPS if module is not None else ():
                if hasattr(module, name):
                    def spy(*args, _fn=getattr(module, name), _key=(backend, family), **kwargs):
                        calls[_key] += 1
                        return _fn(*args, **kwargs)

                    monkeypatch.setattr(module, name, spy)
    return calls


def check_follows_baseline(model, data, nodes, monkeypatch):
    base = fm.generate(model, data, nodes, backend=BASELINE, **OPTIONS)
    calls = _spy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fm.generate(model, data, nodes, backend="triton", **OPTIONS)
    assert fast.settings["backend"] == "triton"
    fallbacks = [str(w.message) for w in caught if "fastmetamer" in str(w.message)]
    assert not fallbacks, fallbacks
    for family in FAMILIES:  # every family ran on Triton, none elsewhere
        assert calls[("triton", family)] > 0, f"{family} never ran on triton: {dict(calls)}"
    assert all(backend == "triton" for backend, _ in calls), dict(calls)
    first, want = fast.history[:10], base.history[:10]
    assert first.shape == want.shape and first.shape[0] == 10
    relative = ((first - want).abs() / want.abs()).max()
    assert relative < 1e-3, f"triton {first}\n{BASELINE} {want}"


def test_generate_follows_cpu_on_synthetic(monkeypatch):
    data = fm.datasets.synthetic_graph(num_nodes=300, num_features=100, seed=1)
    torch.manual_seed(0)
    model = train_node_classifier(models.GCN(data.num_features, 16, num_layers=2, out_channels=int(data.y.max()) + 1),
                                  data, epochs=30)
    check_follows_baseline(model, data, data.test_mask.nonzero().flatten()[:2].tolist(), monkeypatch)


@pytest.mark.data
def test_generate_follows_cpu_on_cora(shared_data, monkeypatch):
    cora = fm.datasets.load("Cora", root=shared_data)
    torch.manual_seed(0)
    model = train_node_classifier(models.GCN(cora.num_features, 16, num_layers=2, out_channels=7), cora, epochs=30)
    check_follows_baseline(model, cora, [11, 1200], monkeypatch)
