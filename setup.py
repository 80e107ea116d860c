"""Build script for fam-diffusion.

The compiled extension ``fam_kernels._C`` holds
  * the C++ CPU kernels (``csrc/cpu/*.cpp``, OpenMP) -- always built;
  * the CUDA kernels (``csrc/cuda/*.cu`` + ``csrc/cuda/*.cpp`` bindings) -- built when a
    CUDA toolkit and a CUDA build of torch are present and a GPU is visible, or when
    ``FAM_KERNELS_FORCE_CUDA=1`` (CUDA torch + toolkit, no GPU needed).
``FAM_KERNELS_SKIP_BUILD=1`` skips all compilation: only the pure-torch and Triton
backends are then available. Install with ``pip install -e . --no-build-isolation``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FAM_KERNELS_SKIP_BUILD"):
        print("fam_kernels: FAM_KERNELS_SKIP_BUILD set, building no extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
    link_flags = ["-fopenmp"]

    force_cuda = _flag("FAM_KERNELS_FORCE_CUDA")
    have_toolkit = ce.CUDA_HOME is not None
    with_cuda = force_cuda or (have_toolkit and torch.version.cuda is not None and torch.cuda.is_available())
    if with_cuda:
        if torch.version.cuda is None or not have_toolkit:
            raise RuntimeError(
                "FAM_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={ce.CUDA_HOME})"
            )
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        ext = ce.CUDAExtension(
            "fam_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("FAM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link_flags,
        )
    else:
        ext = ce.CppExtension(
            "fam_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="fam-diffusion",
    version=VERSION,
    description="FAM diffusion (Frequency + Attention Modulation): kernel-accelerated ops and an SDXL sampler",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # fam_kernels (ops) and fam (sampler, CLI) are the library; fam_demo (the embedded model and its
    # commands) ships alongside and is imported by `fam demo` / `fam eval` only
    packages=find_packages(include=["fam_kernels", "fam_kernels.*", "fam", "fam.*", "fam_demo", "fam_demo.*"]),
    package_data={"fam_demo": ["model/*", "model/**/*"], "fam": ["configs/*/*.json", "configs/*/*/*.json"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "numpy", "pillow"],
    extras_require={
        "sampler": ["diffusers>=0.30", "transformers>=4.46", "safetensors", "accelerate"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["fam=fam.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
