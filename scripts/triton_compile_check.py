"""Compile the Triton kernels for a CUDA GPU on a machine without one, and report their registers.

Triton's interpreter (which runs the kernel tests on CPU) accepts code that Triton's compiler
refuses, such as a non-constexpr global or an operation that only numpy broadcasts. This
compiles every kernel, in the configurations the wrappers launch, down to a cubin for one GPU
architecture (default sm_90, e.g. H100/H200) with the ptxas shipped in the Triton wheel; no
GPU or driver is needed. With `--registers` it also prints each kernel's registers per thread
and spill bytes (ptxas -v), which bound how many programs fit on a multiprocessor.

    python scripts/triton_compile_check.py              # the kernels the tests use
    python scripts/triton_compile_check.py --registers  # + every head_dim 64/128, GQA 1..8 (decode, paged)

Must run without TRITON_INTERPRET=1 (the kernels are defined when their module is imported).
This script does not run or time anything.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from kvcompress.extras import require_extra
from kvcompress.kernels import triton_decode, triton_pack, triton_paged
from kvcompress.kernels.backend import FEATURE, load_triton
from kvcompress.kernels.fields import TOKEN_ROW_TOKENS, field_widths
from kvcompress.paged import PartLayout

STATS = {"scale_ptr": "*fp16", "zero_ptr": "*fp16", "codes_ptr": "*u8"}
CODES_POINTERS = {"q_ptr": "*fp32", "kc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vc_ptr": "*u8",
                  "vs_ptr": "*fp16", "vz_ptr": "*fp16", "mask_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                  "acc_ptr": "*fp32"}
PARTIALS = {"mask_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, arch: int, num_warps: int = 4):
    """Compile `kernel` with the given pointer types ("*fp32", ...), int32 for every other
    runtime argument, and the given constexprs, for sm_`arch`."""
    triton = load_triton()
    source = require_extra("gpu", "triton.compiler", FEATURE).ASTSource
    target = require_extra("gpu", "triton.backends.compiler", FEATURE).GPUTarget("cuda", arch, 32)
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in kernel.params}
    return triton.compile(source(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                          options={"num_warps": num_warps})


def registers(compiled, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of a compiled kernel, from `ptxas -v`."""
    get_ptxas = require_extra("gpu", "triton.backends.nvidia.compiler", FEATURE).get_ptxas
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        done = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    used = int(re.search(r"Used (\d+) registers", text).group(1))
    return used, int(re.search(r"(\d+) bytes spill stores", text).group(1))


def pack_case(bits: int, axis: str, head_dim: int, group: int, dtype: str) -> tuple:
    w1, w2 = field_widths(bits)
    row = group if axis == "channel" else TOKEN_ROW_TOKENS
    constexprs = {"D": head_dim, "GROUP": group, "LEVELS": (1 << bits) - 1, "W1": w1, "W2": w2,
                  "ROW_BYTES": row * head_dim * bits // 8}
    if axis == "channel":
        return (f"pack per channel, {bits} bits, head_dim {head_dim}, {dtype}", triton_pack._pack_channel_kernel,
                {"x_ptr": f"*{dtype}", **STATS}, constexprs, 4)
    return (f"pack per token, {bits} bits, head_dim {head_dim}, {dtype}", triton_pack._pack_token_kernel,
            {"x_ptr": f"*{dtype}", **STATS}, {**constexprs, "ROW": row}, 4)


def decode_cases(key_bits: int, value_bits: int, rep: int, head_dim: int, dtype: str, mask: bool) -> list[tuple]:
    """The three decode kernels as `triton_decode.decode_attention` launches them (per-channel
    keys and per-token values in groups of 32)."""
    block = triton_decode.block_tokens_for(rep, head_dim, head_dim)
    sizes = {"REP": rep, "D": head_dim, "DV": head_dim, "REP_P": 1 << (rep - 1).bit_length(), "D_P": head_dim,
             "DV_P": head_dim}
    kw1, kw2 = field_widths(key_bits)
    vw1, vw2 = field_widths(value_bits)
    codes = {**sizes, "BLOCK": block, "HAS_MASK": mask, "K_W1": kw1, "K_W2": kw2, "K_ROW": 32, "K_GROUP": 32,
             "K_CHANNEL": True, "V_W1": vw1, "V_W2": vw2, "V_ROW": TOKEN_ROW_TOKENS, "V_GROUP": 32,
             "V_CHANNEL": False}
    what = f"K{key_bits}/V{value_bits}, GQA {rep}, head_dim {head_dim}, tile {block}"
    full_pointers = {"q_ptr": "*fp32", **{name: f"*{dtype}" for name in ("sk_ptr", "sv_ptr", "wk_ptr", "wv_ptr")},
                     **PARTIALS}
    return [
        (f"decode over codes, {what}", triton_decode._codes_partial_kernel, CODES_POINTERS, codes,
         triton_decode.NUM_WARPS),
        (f"decode over sinks and window, {dtype}, {what}", triton_decode._full_partial_kernel, full_pointers,
         {**sizes, "BLOCK": block, "HAS_MASK": mask}, triton_decode.NUM_WARPS),
        (f"combine, GQA {rep}, head_dim {head_dim}", triton_decode._combine_kernel,
         {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*fp32"},
         {key: sizes[key] for key in ("REP", "DV", "REP_P", "DV_P")}, 4),
    ]


PAGED_PARTS = {"int4": ("quant", 4, 32), "int3": ("quant", 3, 32), "int8": ("quant", 8, 32), "int2": ("quant", 2, 16),
               "hadamard-int4": ("hadamard+quant", 4, 32), "cb3": ("rotated+codebook", 3, 0),
               "cb2": ("rotated+codebook", 2, 0), "bf16": ("none", 0, 0)}


def paged_cases(key: str, value: str, rep: int, head_dim: int) -> list[tuple]:
    """The paged store, attention, combine and rotation kernels as `triton_paged` launches them."""
    parts = []
    for name in (key, value):
        method, bits, group = PAGED_PARTS[name]
        parts.append(PartLayout(method, head_dim, bits=bits, group_size=group))
    k, v = parts
    what = f"K {key}, V {value}, head_dim {head_dim}"
    store = {"D": head_dim, "N_BOUNDS_P": 16, "TAIL_P": 4}
    pointers = {"pages_ptr": "*u8", "slot_mapping_ptr": "*i64", "scales_ptr": "*fp32"}
    for prefix, part in (("K", k), ("V", v)):
        raw = part.method == "none"
        store.update(triton_paged._part_constants(part, prefix))
        store.update({f"{prefix}_BYTES": part.nbytes, f"{prefix}_BYTES_P": 1 << (part.nbytes - 1).bit_length(),
                      f"{prefix}_ROW": part.nbytes if raw else head_dim})
        pointers.update({f"{prefix.lower()}_ptr": "*u8" if raw else "*fp32", f"{prefix.lower()}_book": "*fp32",
                         f"{prefix.lower()}_bounds": "*fp32"})
    rep_p = 1 << (rep - 1).bit_length()
    attend = {"REP": rep, "REP_P": rep_p, "D": head_dim, "BLOCK": triton_paged.block_tokens(rep, head_dim),
              "SPLIT": triton_paged.SPLIT_TOKENS, **triton_paged._part_constants(k, "K"),
              **triton_paged._part_constants(v, "V"), "K_KIND": 2, "V_KIND": 2, "V_OFFSET": k.nbytes}
    attend_pointers = {"q_ptr": "*fp32", "pages_ptr": "*u8", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
                       "qsl_ptr": "*i32", "token_request_ptr": "*i32", "k_book": "*fp32", "v_book": "*fp32",
                       **PARTIALS, "scale": "fp32"}
    floats = {name: "*fp32" for name in ("m_ptr", "l_ptr", "acc_ptr", "out_ptr", "lse_ptr", "x_ptr", "r_ptr")}
    return [
        (f"paged store, {what}", triton_paged._store_kernel, pointers, store, triton_paged.NUM_WARPS),
        (f"paged attention, {what}, GQA {rep}, tile {attend['BLOCK']}", triton_paged._attend_kernel, attend_pointers,
         attend, triton_paged.ATTEND_WARPS),
        (f"paged combine, GQA {rep}, head_dim {head_dim}", triton_paged._combine_kernel, floats,
         {"REP": rep, "REP_P": rep_p, "D": head_dim}, triton_paged.NUM_WARPS),
        (f"paged rotation, {4 * rep} heads, head_dim {head_dim}", triton_paged._rotate_kernel, floats,
         {"ROWS": 4 * rep, "ROWS_P": 4 * rep_p, "D": head_dim, "COLUMNS": triton_paged.ROTATE_COLUMNS},
         triton_paged.NUM_WARPS),
    ]


def cases(wide: bool) -> list[tuple]:
    """Kernel configurations: a few covering every code path, or (wide) the shapes of common models."""
    if not wide:
        return [pack_case(3, "channel", 64, 32, "fp32"), pack_case(4, "token", 128, 32, "bf16"),
                *decode_cases(3, 2, 4, 64, "bf16", mask=True), *decode_cases(8, 4, 3, 128, "fp32", mask=False)[:2],
                *paged_cases("int4", "int4", 4, 64), *paged_cases("int3", "hadamard-int4", 3, 128),
                *paged_cases("cb3", "bf16", 1, 64)[:2], *paged_cases("int8", "cb2", 8, 128)[:2]]
    out = [pack_case(bits, axis, head_dim, 32, "bf16") for head_dim in (64, 128) for bits in (2, 3, 4, 8)
           for axis in ("channel", "token")]
    out += [case for head_dim in (64, 128) for rep in (1, 2, 4, 8)
            for case in decode_cases(4, 4, rep, head_dim, "bf16", mask=True)]
    out += [case for head_dim in (64, 128) for rep in (1, 2, 4, 8) for key, value in (("int4", "int4"), ("cb3", "cb2"))
            for case in paged_cases(key, value, rep, head_dim)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = sm_90)")
    parser.add_argument("--registers", action="store_true",
                        help="print registers and spill bytes (ptxas -v) for the shapes of common models")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    for name, kernel, pointers, constexprs, num_warps in cases(args.registers):
        compiled = compile_kernel(kernel, pointers, constexprs, args.arch, num_warps)
        line = f"compiled for sm_{args.arch}: {name}, {num_warps} warps"
        if args.registers:
            regs, spills = registers(compiled, args.arch)
            line += f": {regs} registers, {spills} spill bytes"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
