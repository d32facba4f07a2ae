"""Compile the packed-unpacking GEMV (and, for comparison, the current GEMV) offline for sm_90.

No GPU needed: Triton lowers to PTX and runs the ptxas shipped in its wheel. Prints registers,
spills and the count of the unpacking instructions per config; ``--dump DIR`` keeps PTX and SASS.

    python scripts/gpu/compile_w4a16_gemv_packed.py [--dump /tmp/gemv_packed]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the JIT functions

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantkit.kernels.w4a16_gemv_packed_triton import w4a16_gemv_packed_kernel
from quantkit.kernels.w4a16_gemv_triton import w4a16_gemv_kernel

SIGNATURE = {
    "x_ptr": "*bf16",
    "qweight_ptr": "*i32",
    "scales_ptr": "*bf16",
    "zeros_ptr": "*bf16",
    "perm_ptr": "*i64",
    "bias_ptr": "*bf16",
    "out_ptr": "*bf16",
    "N": "i32",
    "K": "i32",
    "stride_xm": "i32",
    "stride_om": "i32",
    "k_per_split": "i32",
}


def compile_one(kernel, constants: dict, num_warps: int, num_stages: int, out_fp32: bool):
    sig = dict(SIGNATURE)
    if out_fp32:
        sig["out_ptr"] = "*fp32"
    for name in constants:
        sig[name] = "constexpr"
    src = ASTSource(kernel, sig, constexprs=constants)
    return triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def sass_counts(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    ops = [line.split("*/")[1].strip().split()[0] for line in sass.splitlines() if "*/" in line and "/*0" in line]
    ops = [op for op in ops if not op.startswith("@")] + [
        line.split("*/")[1].strip().split()[1] for line in sass.splitlines()
        if "*/" in line and "/*0" in line and line.split("*/")[1].strip().startswith("@")
    ]
    counts = {}
    for op in ops:
        base = op.split(".")[0]
        counts[base] = counts.get(base, 0) + 1
    resources = next((line.strip() for line in usage.splitlines() if "REG:" in line), usage.strip())
    return counts, sass, resources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump")
    args = ap.parse_args()
    dump = Path(args.dump) if args.dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    cases = []
    for block_n, block_k, split, warps, perm, bias in [
        (128, 128, 1, 4, False, True),
        (128, 128, 4, 4, False, False),
        (256, 128, 4, 8, False, False),
        (64, 256, 4, 4, False, False),
        (256, 256, 2, 8, True, False),
        (128, 128, 1, 4, True, True),
    ]:
        cases.append((block_n, block_k, split, warps, perm, bias))
    for kernel_name, kernel, extra in [
        ("packed", w4a16_gemv_packed_kernel, {}),
        ("current", w4a16_gemv_kernel, {"FAST_CODES": True}),
    ]:
        for block_n, block_k, split, warps, perm, bias in cases:
            constants = {
                "BITS": 4,
                "PACK": 8,
                "GROUP_SIZE": 128 if block_k <= 128 else 256,
                "BLOCK_N": block_n,
                "BLOCK_K": block_k,
                "SPLIT_K": split,
                "HAS_PERM": perm,
                "HAS_BIAS": bias,
                **extra,
            }
            compiled = compile_one(kernel, constants, warps, 2, out_fp32=split > 1)
            meta = compiled.metadata
            counts, sass, resources = sass_counts(compiled.asm["cubin"])
            label = f"{kernel_name} n{block_n} k{block_k} s{split} w{warps} perm={int(perm)} bias={int(bias)}"
            interesting = {op: counts.get(op, 0) for op in ("LOP3", "SHF", "HADD2", "F2F", "FFMA", "FADD", "FMUL", "I2F", "LDG", "IMAD")}
            print(
                f"{label:45s} {resources}\n    shared {meta.shared}  SASS {interesting}",
                flush=True,
            )
            if dump:
                stem = label.replace(" ", "_").replace("=", "")
                (dump / f"{stem}.ptx").write_text(compiled.asm["ptx"])
                (dump / f"{stem}.sass").write_text(sass)


if __name__ == "__main__":
    main()
