"""Ahead-of-time compile of every Triton kernel for sm_90 (no GPU needed; uses the bundled ptxas).

Run WITHOUT TRITON_INTERPRET: ``python tests/triton/aot_compile_check.py``. Catches lowering errors
the interpreter cannot see (unsupported dtypes/ops on the real compiler path). Not a pytest module.
"""
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastmetamer.ops.aggregate import triton as A
from fastmetamer.ops.loss import triton as L
from fastmetamer.ops.update import triton as U
target = GPUTarget("cuda", 90, 32)
def comp(kernel, sig, consts):
    full = {}
    for name in kernel.arg_names:
        full[name] = "constexpr" if name in consts else sig[name]
    src = ASTSource(kernel, full, constexprs=consts)
    return triton.compile(src, target=target)
fails = 0
def tryc(label, *a):
    global fails
    try:
        comp(*a)
        print("ok  ", label)
    except Exception as e:
        fails += 1
        print("FAIL", label, type(e).__name__, str(e)[:600])
for fp, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
  for act in range(6):
    sig = dict(rowptr_ptr="*i64", col_ptr="*i64", w_ptr="*"+fp, x_ptr="*"+fp, bias_ptr="*"+fp, res_ptr="*"+fp,
               out_ptr="*"+fp, saved_ptr=("*u8" if act == 1 else "*"+fp), f="i32", nbytes="i32")
    tryc(f"fwd {fp} act{act}", A._forward_kernel, sig, dict(HAS_BIAS=True, HAS_RES=True, ACT=act, BLOCK_E=16, BLOCK_F=128, ACC=acc))
    sig = dict(t_rowptr_ptr="*i64", t_col_ptr="*i64", t_w_ptr="*"+fp, gout_ptr="*"+fp, saved_ptr=("*u8" if act == 1 else "*"+fp), out_ptr="*"+fp, f="i32", nbytes="i32")
    tryc(f"bwd {fp} act{act}", A._backward_kernel, sig, dict(ACT=act, BLOCK_E=16, BLOCK_F=128, ACC=acc))
    sig = dict(rowptr_ptr="*i64", col_ptr="*i64", gout_ptr="*"+fp, saved_ptr=("*u8" if act == 1 else "*"+fp), x_ptr="*"+fp, out_ptr="*"+fp,
               n="i32", num_edges="i32", f="i32", nbytes="i32", search_steps="i32")
    tryc(f"edge {fp} act{act}", A._edge_grad_kernel, sig, dict(ACT=act, BLOCK_E=32, BLOCK_F=64, ACC=acc))
    sig = dict(rowptr_ptr="*i64", col_ptr="*i64", w_ptr="*"+fp, x_ptr="*"+fp, bias_ptr="*"+fp, target_ptr="*"+fp, comp_ptr="*i64",
               scale_ptr="*"+fp, grad_ptr="*"+fp, row_loss_ptr="*"+fp, f="i32")
    tryc(f"loss {fp} act{act}", L._matched_loss_kernel, sig, dict(HAS_BIAS=True, ACT=act, BLOCK_E=16, BLOCK_F=128, ACC=acc))
  key = tl.int64 if fp == "fp64" else tl.int32
  sig = dict(theta_ptr="*"+fp, blk_ptr="*i64", cand_ptr="*i64", cnt_ptr="*i32", num_rows="i32", d="i32", slope="fp32")
  tryc(f"count {fp}", U._count_ge_kernel, sig, dict(KEY=key, BLOCK_R=16, BLOCK_D=64))
  sig = dict(theta_ptr="*"+fp, blk_ptr="*i64", ksel_ptr="*i64", gt_ptr="*i32", eq_ptr="*i32", num_rows="i32", d="i32", slope="fp32")
  tryc(f"ties {fp}", U._row_ties_kernel, sig, dict(KEY=key, BLOCK_R=16, BLOCK_D=64))
  sig = dict(theta_ptr="*"+fp, blk_ptr="*i64", ksel_ptr="*i64", quota_ptr="*i64", hard_ptr="*"+fp, num_rows="i32", d="i32", slope="fp32")
  tryc(f"mask {fp}", U._mask_kernel, sig, dict(KEY=key, BLOCK_R=16, BLOCK_D=64))
  sig = dict(theta_ptr="*"+fp, gx_ptr="*"+fp, m_ptr="*"+fp, v_ptr="*"+fp, thr_ptr="*"+fp, ms_ptr="*"+fp, active_ptr="*u8", numel="i32", d="i32",
             lr="fp32", beta1="fp32", beta2="fp32", eps="fp32", slope="fp32", margin="fp32", bc1="fp32", bc2="fp32")
  tryc(f"adam {fp}", U._adam_ste_kernel, sig, dict(FP64=fp == "fp64", BLOCK=1024))
print("fails", fails)
raise SystemExit(1 if fails else 0)
