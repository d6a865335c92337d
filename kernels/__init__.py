"""The recurrences as plain functions over tensors, layout ``[B, T, H, D]``.

Each op returns ``(output, final_state)``, takes ``initial_state`` and ``backend=``:
``recurrent`` (the loop, the oracle and the streaming ``*_step``), ``chunk`` (chunked
parallel PyTorch, the CPU default and export path), ``cpu`` (gated linear attention only: the
chunked form as one fused C kernel, ``cpu/gla.c``, built at first use by ``compiled.py``),
``triton`` (GPU kernels; on CPU under ``TRITON_INTERPRET=1``); ``auto`` picks triton for CUDA
tensors, and elsewhere ``cpu`` where an op has it and it is built, chunk otherwise (always chunk
for float64 inputs and while ``torch.compile``/``torch.export`` trace).
"""

from seqapps.kernels.delta_rule import delta_rule, delta_rule_step
from seqapps.kernels.gla import gated_linear_attention, gla_step
from seqapps.kernels.scan2d import scan2d, scan2d_step
from seqapps.kernels.selective_scan import selective_scan, selective_scan_step

__all__ = ["gated_linear_attention", "gla_step", "delta_rule", "delta_rule_step", "selective_scan",
           "selective_scan_step", "scan2d", "scan2d_step"]
