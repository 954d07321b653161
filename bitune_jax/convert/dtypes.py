"""Tensor element types as the checkpoint formats name them, as NumPy dtypes: torch's
(`torch.float32` pickles as `torch float32`), its legacy typed storages, and
safetensors' codes. bfloat16 and float8 are `ml_dtypes` (exact)."""

import ml_dtypes
import numpy as np

DTYPES = {name: np.dtype(t) for name, t in {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "complex64": np.complex64,
    "complex128": np.complex128, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_}.items()}
# torch's legacy typed storages -> a `DTYPES` name
STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32",
            "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
            "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
            "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
            "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128"}
# safetensors header dtype -> a `DTYPES` name
SAFETENSORS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
