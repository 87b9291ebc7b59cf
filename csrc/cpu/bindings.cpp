// Python bindings of the CPU kernels: the module fastmetamer._C. Activations are passed as the
// integer codes of fastmetamer.ops.activations.ACT_CODES.
#include "common.h"

#include <limits>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmetamer CPU (C++/OpenMP) fused kernels";
  m.def("aggregate_forward", &fm::aggregate_forward, "CSR aggregation with fused bias/activation/residual",
        py::arg("rowptr"), py::arg("col"), py::arg("weight"), py::arg("x"), py::arg("bias"), py::arg("act"),
        py::arg("residual"));
  m.def("aggregate_backward", &fm::aggregate_backward, "A^T (grad_out * act'(pre)) over the transposed CSR",
        py::arg("t_rowptr"), py::arg("t_col"), py::arg("t_weight"), py::arg("grad_out"), py::arg("saved"),
        py::arg("act"));
  m.def("edge_grad", &fm::edge_grad, "SDDMM edge-weight gradient", py::arg("rowptr"), py::arg("col"),
        py::arg("grad_out"), py::arg("saved"), py::arg("act"), py::arg("x"));
  m.def("propagate_forward", &fm::propagate_forward,
        "unit-weight CSR propagation with per-row scale, self term, bias and activation", py::arg("rowptr"),
        py::arg("col"), py::arg("x"), py::arg("row_scale"), py::arg("self_x"), py::arg("self_scale"),
        py::arg("bias"), py::arg("act"), py::arg("skip_loops"));
  m.def("edge_softmax", &fm::edge_softmax, "edge-weighted softmax over each CSR row's entries, per head",
        py::arg("rowptr"), py::arg("logits"), py::arg("weight"));
  m.def("edge_softmax_backward", &fm::edge_softmax_backward, "gradients of edge_softmax (logits, weights)",
        py::arg("rowptr"), py::arg("alpha"), py::arg("beta"), py::arg("grad_alpha"));
  m.def("matched_loss", &fm::matched_loss, "matched layer fused with the activation-matching loss",
        py::arg("rowptr"), py::arg("col"), py::arg("weight"), py::arg("x"), py::arg("target"),
        py::arg("component"), py::arg("scale"), py::arg("bias"), py::arg("act"));
  m.def("top_mask", &fm::top_mask, "top-k hard mask and threshold per row block", py::arg("theta"),
        py::arg("ptr"), py::arg("k"), py::arg("slope"));
  m.def("top_mask_csr", &fm::top_mask_csr, "the ones of top_mask's mask as CSR (rowptr, col) and the threshold",
        py::arg("theta"), py::arg("ptr"), py::arg("k"), py::arg("slope"));
  m.def("group_by", &fm::group_by, "stable counting sort: (rowptr, order) of the entries grouped by key",
        py::arg("keys"), py::arg("num_groups"));
  m.def("append_node_entries", &fm::append_node_entries,
        "CSR (rowptr, col, order) of a graph's in-edges with one entry per node appended to each row",
        py::arg("rowptr"), py::arg("source"), py::arg("edge_id"), py::arg("node_col"));
  m.def("linear_input_grad", &fm::linear_input_grad, "out (+)= grad @ weight^T in row tiles (in place)",
        py::arg("out"), py::arg("grad"), py::arg("weight"), py::arg("accumulate"));
  m.def("adam_ste_update", &fm::adam_ste_update,
        "fused margin + straight-through + Adam step (in place) with the gradient grad_x + grad_rows @ weight^T",
        py::arg("theta"), py::arg("grad_x"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("slope"),
        py::arg("threshold"), py::arg("margin"), py::arg("margin_scale"), py::arg("active"),
        py::arg("bound") = std::numeric_limits<double>::infinity(), py::arg("grad_rows") = py::none(),
        py::arg("weight") = py::none());
}
