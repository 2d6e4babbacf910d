"""The compression engine: quantization (int8, int4 RTN/GPTQ/AWQ), pruning (magnitude, Wanda,
SparseGPT, 2:4) and low-rank SVD of a model's decoder linears, into the formats of
tokenmill.common.model.quant that the inference engine serves. Imports only torch and the shared
model code; each method is also usable on its own (gptq, prune, lowrank, awq modules).
"""

from tokenmill.common.compress.checks import MIN_CALIBRATION_TOKENS
from tokenmill.common.compress.engine import build_model, compress_model, tensor_bytes
from tokenmill.common.compress.spec import (
    METHODS,
    CompressedResult,
    MethodSpec,
    Progress,
    ProgressCallback,
)

__all__ = [
    "METHODS",
    "MIN_CALIBRATION_TOKENS",
    "CompressedResult",
    "MethodSpec",
    "Progress",
    "ProgressCallback",
    "build_model",
    "compress_model",
    "tensor_bytes",
]
