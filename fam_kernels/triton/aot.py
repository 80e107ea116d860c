"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU.

``triton.compile`` with a ``GPUTarget`` lowers a kernel to PTX for a given SM
architecture on any machine; ``ptxas -v`` then reports registers, spills and shared
memory -- the closest thing to a GPU check available on a CPU-only machine. Used by
the tests (no spills at the default configurations) and by the benchmarks (which
record the figures per configuration).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Optional

ARCHS = (80, 90)


@dataclass
class KernelReport:
    kernel: str
    arch: int
    config: Dict[str, object]
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # static (ptxas) + dynamic (Triton's pipelining buffers)
    ptxas_log: str = field(repr=False, default="")

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def ptxas_path() -> Optional[str]:
    return shutil.which("ptxas") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "ptxas") if os.environ.get("CUDA_HOME") else None
    )


def compile_kernel(fn, signature: Dict[str, str], constexprs: Dict[str, object], arch: int,
                   num_warps: int = 4, num_stages: int = 3) -> KernelReport:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<arch>`` and run ``ptxas -v`` on it.

    ``signature`` maps every non-constexpr argument to a Triton type string
    ("*fp32", "i32", "fp32", ...); ``constexprs`` gives the constexpr values.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_sig = dict(signature)
    for name in constexprs:
        full_sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=full_sig, constexprs=dict(constexprs))
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    name = compiled.metadata.name
    ptxas = ptxas_path()
    if ptxas is None:
        raise RuntimeError("ptxas not found on PATH (install a CUDA toolkit or set CUDA_HOME)")
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "k.ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"-arch={target}", ptx_file, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name} on sm_{arch}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return KernelReport(
        kernel=name,
        arch=arch,
        config={**constexprs, "num_warps": num_warps, "num_stages": num_stages},
        registers=int(regs.group(1)) if regs else -1,
        spill_stores=int(spills.group(1)) if spills else 0,
        spill_loads=int(spills.group(2)) if spills else 0,
        shared_bytes=(int(smem.group(1)) if smem else 0) + int(compiled.metadata.shared),
        ptxas_log=log,
    )
