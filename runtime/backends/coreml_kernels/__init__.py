"""The MIL kernels of the Core ML reference evaluator, one module per op family.

Each family module registers its kernels in `KERNELS` (base.py) at import, each beside its support
check where it implements only part of the op. A new op: a function in its family's module with
`@KERNELS.register("op_type")`; nothing else changes. Kernels follow the MIL op definitions in the
coremltools documentation and compute in float32 (`Args.f` upcasts fp16 inputs).
"""

from __future__ import annotations

from edgeopt.runtime.backends.coreml_kernels import (  # noqa: F401  (imported to register their kernels)
    activations,
    conv,
    elementwise,
    gather,
    linear,
    normalization,
    pooling,
    quantize,
    reductions,
    resize,
    shape,
)
from edgeopt.runtime.backends.coreml_kernels.base import KERNELS, Args, MilValue, unpack_bits, unsupported

__all__ = ["KERNELS", "Args", "MilValue", "unpack_bits", "unsupported"]
