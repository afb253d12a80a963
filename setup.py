"""Build script. Metadata and requirements come from settings.ini (nbdev's single source); this file adds the
compiled core `deepfusion_ref._C`: a C++ (CPU) extension always, plus the CUDA kernels when the installed torch
is a CUDA build and nvcc is found. Build with `pip install --no-build-isolation -e .` so the extension compiles
against the torch it will run with."""
import glob
import os
from configparser import ConfigParser

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
parser = ConfigParser(delimiters=["="])
parser.read(os.path.join(HERE, "settings.ini"), encoding="utf-8")
cfg = parser["DEFAULT"]

LICENSES = {"apache2": "Apache-2.0"}
STATUSES = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]


def compiled_core():
    """The extension modules and the build_ext command; empty when DEEPFUSION_REF_NO_EXTENSION=1."""
    if os.environ.get("DEEPFUSION_REF_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
    except ImportError as e:
        raise SystemExit("deepfusion_ref's extension compiles against the installed torch: install torch first, then "
                         "`pip install --no-build-isolation -e .` (or set DEEPFUSION_REF_NO_EXTENSION=1)") from e
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # The C++ standard is torch's choice (c++20 for torch 2.13). -fopenmp: at::parallel_for is a header template
    # that expands to `#pragma omp parallel` in *our* translation unit, so without it the CPU kernels run on one
    # thread. The resulting libgomp.so.1 dependency resolves to the copy torch has already loaded.
    # -fno-trapping-math: no kernel reads floating-point exception flags, and without it GCC keeps every clamp
    # (x < lo ? lo : x) as a branch, which stops `omp simd` from vectorising the SiLU's exp (clang's default).
    # -fno-thread-jumps: GCC otherwise threads that clamp into the SiLU's division, computing u / (1 + e^88) in
    # every lane: denormal results, which cost AVX2 and SSE code 3x (measured; the AVX-512 code masks them).
    # Wider instruction sets come from csrc/cpu/isa.h at run time, not from -march.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-thread-jumps"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))  # schemas, then one file per op
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("DEEPFUSION_REF_NO_CUDA") != "1")
    if with_cuda:
        # A100 (sm_80) and H100 (sm_90) by default; override with TORCH_CUDA_ARCH_LIST.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension("deepfusion_ref._C", sources,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("deepfusion_ref._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = compiled_core()

setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license=LICENSES[cfg["license"]],
    keywords=cfg["keywords"].split(),
    classifiers=[
        "Development Status :: " + STATUSES[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
        "Programming Language :: Python :: " + cfg["min_python"],
    ],
    python_requires=">=" + cfg["min_python"],
    packages=find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=cfg.get("requirements", "").split(),
    extras_require={"dev": cfg.get("dev_requirements", "").split()},
    entry_points={"console_scripts": cfg.get("console_scripts", "").split(),
                  "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
