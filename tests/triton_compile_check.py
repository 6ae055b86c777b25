"""Compile every Triton kernel of kvcompress for a CUDA GPU (sm_90) without one: `python -m` or
import and call `main()` in a process where TRITON_INTERPRET is not set.

Triton's interpreter (what tests/test_triton.py runs on CPU) accepts code that the compiler
refuses (non-constexpr globals, shapes that only numpy broadcasts); compiling down to a cubin
with the ptxas shipped in the Triton wheel catches those without a GPU. Prints one line per
kernel and exits non-zero on the first failure.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvcompress.kernels import triton_decode, triton_pack

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict) -> None:
    """Compile `kernel` with the given pointer types ("*fp32", ...), int32 for every other
    runtime argument, and the given constexprs."""
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = pointers.get(param.name, "i32")
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)


def main() -> int:
    stats = {"scale_ptr": "*fp16", "zero_ptr": "*fp16", "codes_ptr": "*u8"}
    cases = [
        ("pack per channel, 3 bits, float32", triton_pack._pack_channel_kernel, {"x_ptr": "*fp32", **stats},
         {"D": 64, "GROUP": 32, "LEVELS": 7, "W1": 2, "W2": 1, "ROW_BYTES": 32 * 64 * 3 // 8}),
        ("pack per token, 4 bits, bfloat16", triton_pack._pack_token_kernel, {"x_ptr": "*bf16", **stats},
         {"D": 128, "GROUP": 32, "LEVELS": 15, "ROW": 8, "W1": 4, "W2": 0, "ROW_BYTES": 8 * 128 * 4 // 8}),
        ("decode over codes, K 3-bit per channel, V 2-bit per token, GQA 4, mask",
         triton_decode._codes_partial_kernel,
         {"q_ptr": "*fp32", "kc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vc_ptr": "*u8",
          "vs_ptr": "*fp16", "vz_ptr": "*fp16", "mask_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
          "acc_ptr": "*fp32"},
         {"REP": 4, "D": 64, "DV": 64, "REP_P": 4, "D_P": 64, "DV_P": 64, "BLOCK": triton_decode.BLOCK_T,
          "K_W1": 2, "K_W2": 1, "K_ROW": 32, "K_GROUP": 32, "K_CHANNEL": True,
          "V_W1": 2, "V_W2": 0, "V_ROW": 8, "V_GROUP": 32, "V_CHANNEL": False, "HAS_MASK": True}),
        ("decode over sinks and window, bfloat16, GQA 1, no mask", triton_decode._full_partial_kernel,
         {"q_ptr": "*fp32", "sk_ptr": "*bf16", "sv_ptr": "*bf16", "wk_ptr": "*bf16", "wv_ptr": "*bf16",
          "mask_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"},
         {"REP": 1, "D": 64, "DV": 64, "REP_P": 1, "D_P": 64, "DV_P": 64, "BLOCK": triton_decode.BLOCK_T,
          "HAS_MASK": False}),
        ("combine partial results, GQA 3", triton_decode._combine_kernel,
         {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*fp32"},
         {"REP": 3, "DV": 64, "REP_P": 4, "DV_P": 64}),
    ]
    for name, kernel, pointers, constexprs in cases:
        compile_kernel(kernel, pointers, constexprs)
        print(f"compiled for sm_90: {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
