"""Ahead-of-time compile of every Triton kernel for sm_90 (no GPU needed; uses the bundled ptxas).

Run WITHOUT TRITON_INTERPRET: ``python tests/triton/aot_compile_check.py``. Catches lowering errors
the interpreter cannot see (unsupported dtypes/ops on the real compiler path). Every kernel is
compiled for fp32 and fp64 data; the aggregation, backward, loss and propagation kernels for every
activation (across them) and both passes of the chunk plan (COMBINE), with the tile shapes the
launchers choose for narrow and wide features; 64-bit sizes where they occur. Exits nonzero on
any failure. Not a pytest module.
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastmetamer.ops.aggregate import triton as A  # noqa: E402
from fastmetamer.ops.loss import triton as L  # noqa: E402
from fastmetamer.ops.update import triton as U  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
failures = []


def check(label: str, kernel, sig: dict, consts: dict, num_warps: int = 4) -> None:
    """Compile ``kernel`` with argument types ``sig``, constexprs ``consts`` and the launcher's
    ``num_warps``; record a failure."""
    try:
        missing = [a for a in kernel.arg_names if a not in sig and a not in consts]
        if missing:
            raise KeyError(f"no type for {missing}")
        full = {a: "constexpr" if a in consts else sig[a] for a in kernel.arg_names}
        triton.compile(ASTSource(kernel, full, constexprs=consts), target=TARGET, options={"num_warps": num_warps})
        print("ok  ", label)
    except Exception as err:  # noqa: BLE001 - report every failure, then exit nonzero
        failures.append(label)
        print("FAIL", label, type(err).__name__, str(err)[:600])


def plan_sig(num_items: str = "i32", **rest) -> dict:
    return dict(row_ptr="*i64", lo_ptr="*i64", hi_ptr="*i64", slot_ptr="*i64", num_items=num_items, **rest)


ALL_ACTS = range(6)  # none relu elu leaky_relu tanh gelu

for fp, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
    ptr = "*" + fp

    def blocks(block_f):
        return dict(BLOCK_R=A._block_r(block_f), BLOCK_E=A.BLOCK_E, BLOCK_F=block_f, ACC=acc)

    def saved(act):
        return "*u8" if act == 1 else ptr

    # (act, COMBINE, BLOCK_F) variants: every activation on pass 1 with wide features; pass 2
    # (which shares the epilogues) and narrow features (other tile shapes) on a few.
    wide = [(act, False, A.MAX_BLOCK_F) for act in ALL_ACTS]
    for act, combine, block_f in wide + [(1, True, A.MAX_BLOCK_F), (5, True, 16), (1, False, 16)]:
        tag = f"{fp} act{act} f{block_f}{' combine' if combine else ''}"
        check(f"forward {tag}", A._forward_kernel,
              plan_sig(part_ptr=ptr, col_ptr="*i64", w_ptr=ptr, x_ptr=ptr, bias_ptr=ptr, res_ptr=ptr, out_ptr=ptr,
                       saved_ptr=saved(act), f="i32", nbytes="i32"),
              dict(COMBINE=combine, HAS_BIAS=True, HAS_RES=True, ACT=act, **blocks(block_f)), A.NUM_WARPS)
    for act, combine, block_f in wide + [(1, True, A.MAX_BLOCK_F), (4, False, 16)]:
        tag = f"{fp} act{act} f{block_f}{' combine' if combine else ''}"
        check(f"backward {tag}", A._backward_kernel,
              plan_sig(part_ptr=ptr, t_col_ptr="*i64", t_w_ptr=ptr, gout_ptr=ptr, saved_ptr=saved(act), out_ptr=ptr,
                       f="i32", nbytes="i32"),
              dict(COMBINE=combine, ACT=act, **blocks(block_f)), A.NUM_WARPS)
    for act, combine, block_f in [(0, False, A.MAX_BLOCK_F), (1, False, A.MAX_BLOCK_F), (5, True, 16)]:
        tag = f"{fp} act{act} f{block_f}{' combine' if combine else ''}"
        check(f"propagate {tag}", A._propagate_kernel,
              plan_sig(part_ptr=ptr, col_ptr="*i64", x_ptr=ptr, scale_ptr=ptr, self_ptr=ptr, self_scale_ptr=ptr,
                       bias_ptr=ptr, out_ptr=ptr, f="i32"),
              dict(COMBINE=combine, HAS_SCALE=True, HAS_SELF=True, HAS_SELF_SCALE=True, HAS_BIAS=True,
                   SKIP_LOOPS=True, ACT=act, **blocks(block_f)), A.NUM_WARPS)
    for act, combine, block_f in [(0, False, A.MAX_BLOCK_F), (4, False, A.MAX_BLOCK_F), (5, True, 16)]:
        tag = f"{fp} act{act} f{block_f}{' combine' if combine else ''}"
        check(f"loss {tag}", L._matched_loss_kernel,
              plan_sig(part_ptr=ptr, col_ptr="*i64", w_ptr=ptr, x_ptr=ptr, bias_ptr=ptr, target_ptr=ptr,
                       comp_ptr="*i64", scale_ptr=ptr, grad_ptr=ptr, row_loss_ptr=ptr, f="i32"),
              dict(COMBINE=combine, HAS_BIAS=True, ACT=act, **blocks(block_f)), A.NUM_WARPS)
    for act, size in [(1, "i32"), (4, "i64")]:  # i64: more than 2^31 edges
        check(f"edge_grad {fp} act{act} {size}", A._edge_grad_kernel,
              dict(rowptr_ptr="*i64", col_ptr="*i64", gout_ptr=ptr, saved_ptr=saved(act), x_ptr=ptr, out_ptr=ptr,
                   n=size, num_edges=size, f="i32", nbytes="i32", search_steps="i32"),
              dict(ACT=act, BLOCK_E=A.EDGE_BLOCK, BLOCK_F=64, ACC=acc))
    check(f"forward {fp} i64 sizes", A._forward_kernel,  # more than 2^31 chunks
          plan_sig(num_items="i64", part_ptr=ptr, col_ptr="*i64", w_ptr=ptr, x_ptr=ptr, bias_ptr=ptr, res_ptr=ptr,
                   out_ptr=ptr, saved_ptr="*u8", f="i32", nbytes="i32"),
          dict(COMBINE=False, HAS_BIAS=False, HAS_RES=False, ACT=1, **blocks(64)), A.NUM_WARPS)

    # top-k selection (i64: more than 2^31 rows) and the Adam step
    key = tl.int64 if fp == "fp64" else tl.int32
    tiles = dict(KEY=key, BLOCK_R=U.BLOCK_R, BLOCK_D=U.BLOCK_D)
    for size in ("i32", "i64"):
        check(f"radix_count {fp} {size}", U._radix_count_kernel,
              dict(theta_ptr=ptr, blk_ptr="*i64", num_rows=size, d="i32", slope="fp32", prefix_ptr="*i64",
                   hist_ptr="*i64", shift="i32", high="i64"), dict(tiles, BINS=1 << U.RADIX), U.NUM_WARPS)
    rows = dict(theta_ptr=ptr, blk_ptr="*i64", num_rows="i32", d="i32", slope="fp32")
    check(f"row_ties {fp}", U._row_ties_kernel, dict(rows, ksel_ptr="*i64", gt_ptr="*i64", eq_ptr="*i64"), tiles,
          U.NUM_WARPS)
    for csr in (False, True):
        check(f"select {fp} {'csr' if csr else 'dense'}", U._select_kernel,
              dict(rows, ksel_ptr="*i64", quota_ptr="*i64", out_ptr="*i64" if csr else ptr, rowptr_ptr="*i64",
                   nnz="i64"),
              dict(tiles, CSR=csr), U.NUM_WARPS)
    check(f"adam {fp}", U._adam_ste_kernel,
          dict(theta_ptr=ptr, gx_ptr=ptr, m_ptr=ptr, v_ptr=ptr, thr_ptr=ptr, ms_ptr=ptr, active_ptr="*u8", numel="i64",
               d="i32", lr="fp32", beta1="fp32", beta2="fp32", eps="fp32", slope="fp32", margin="fp32", bc1="fp32",
               bc2="fp32", bound="fp32"),
          dict(CLAMP=True, FP64=fp == "fp64", BLOCK=U.BLOCK_N))

print(f"{len(failures)} failure(s)" + (": " + ", ".join(failures) if failures else ""))
sys.exit(1 if failures else 0)
