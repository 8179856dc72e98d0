"""Build glue: installs kernels/ as ovfast.kernels and builds csrc/ as ovfast._C.

Metadata lives in pyproject.toml. csrc/ holds the pybind11 sources of the CPU side's
native code; while it has no .cpp files no extension is built.
"""
from glob import glob

from setuptools import setup

ext_modules = []
sources = sorted(glob("csrc/*.cpp"))
if sources:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension("ovfast._C", sources, include_dirs=["csrc"], cxx_std=17, extra_compile_args=["-O3"])
    )

setup(
    packages=["ovfast", "ovfast.models", "ovfast.kernels"],
    package_dir={"ovfast": "ovfast", "ovfast.kernels": "kernels"},
    package_data={"ovfast": ["py.typed"]},
    ext_modules=ext_modules,
)
