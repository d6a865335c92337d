"""Every Triton kernel compiled for an H100 (sm_90) with the ptxas that ships with triton: no GPU
needed, and it catches what the interpreter accepts but the compiler refuses (a name re-typed
inside a loop, a tl.dot below 16, a register budget blown). It caught, after the fact, the
selective scan's loop-carried `_` that failed on the first lent H100.

Runs in a subprocess without TRITON_INTERPRET, since this process may have imported the kernels
in interpreter mode, and outside the repository, so that its seqapps/ folder cannot shadow the
installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package")

_COMPILE = textwrap.dedent("""
    import sys
    import importlib
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # per module: constexpr values (by kernel name where they differ), runtime ints and floats,
    # the buffers that are fp32 whatever the inputs, and the warps the host side launches with
    SPECS = {
        "gla": dict(
            constants=dict(K=128, V=128, BT=64, BC=16, BK=64, BV=64, PER_KEY=True, HAS_INITIAL=True,
                           HAS_D_FINAL=True),
            per_kernel={"_chunk_cumsum_kernel": dict(BK=128), "_forward_output_kernel": dict(BK=128),
                        "_backward_dv_kernel": dict(BK=128), "_backward_dq_dk_dg_kernel": dict(BV=128)},
            ints={"T", "T_pad", "n_chunks", "H"}, floats={"scale"},
            fp32={"G", "states", "d_states", "dg", "initial_state", "d_final"}, warps="NUM_WARPS"),
        "delta_rule": dict(
            constants=dict(H=8, K=128, V=128, CHUNK=64, BK=128, BV=16, HAS_G=True, HAS_INITIAL=True,
                           STORE_FINAL=True, STORE_CHECKPOINTS=True, HAS_D_FINAL=True, STORE_D_INITIAL=True),
            per_kernel={}, ints={"T", "n_chunks", "B"}, floats={"scale"},
            fp32={"initial_state", "final_state", "checkpoints", "scratch", "d_final", "d_initial",
                  "dq_parts", "dk_parts", "dbeta_parts", "dg_parts", "g"}, warps=8),
        "selective_scan": dict(
            constants=dict(DELTA_SOFTPLUS=True, NEGATIVE_EIGENVALUES=False, HAS_D=True, HAS_Z=True,
                           HAS_BIAS=True, HAS_H0=True, HAS_DFINAL=True, SAVE_CHECKPOINTS=True, CHUNK=64,
                           BLOCK_D=16, BLOCK_N=16, ACC=tl.float32),
            per_kernel={}, ints={"T", "D", "G", "N", "group_size", "n_blocks", "n_chunks"}, floats=set(),
            fp32={"A", "Dskip", "bias", "h0", "final", "checkpoints", "scratch", "dfinal", "dB_part",
                  "dC_part", "dA_part", "dD_part", "dh0"}, warps=2),
    }
    compiled = []
    for module_name, spec in SPECS.items():
        module = importlib.import_module("seqapps.kernels.triton." + module_name)
        kernels = {name: obj for name, obj in vars(module).items()
                   if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.JITFunction)}
        assert kernels, module_name
        warps = spec["warps"] if isinstance(spec["warps"], int) else getattr(module, spec["warps"])
        for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
            for name, kernel in kernels.items():
                constants = {**spec["constants"], "PRECISION": precision, **spec["per_kernel"].get(name, {})}
                signature, constexprs = {}, {}
                for p in kernel.params:
                    if p.is_constexpr:
                        signature[p.name], constexprs[p.name] = "constexpr", constants[p.name]
                    elif p.name in spec["ints"]:
                        signature[p.name] = "i32"
                    elif p.name in spec["floats"]:
                        signature[p.name] = "fp32"
                    else:
                        signature[p.name] = "*fp32" if p.name in spec["fp32"] else "*" + dtype
                triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
                compiled.append(f"{module_name}.{name}[{dtype}]")
    print("compiled", len(compiled), " ".join(compiled))
""")


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no bundled ptxas to compile for NVIDIA GPUs")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0 and "compiled 20" in proc.stdout, proc.stderr[-3000:]
