"""Build script: ships `triton_kernels/` inside the package as `odenets_fast.triton_kernels`.

The top-level name `triton_kernels` is taken (PyPI's triton-kernels, Triton's own repository),
so the folder is mapped through `package_dir` and never installed under that name.
"""

from setuptools import setup

setup(
    packages=["odenets_fast", "odenets_fast.triton_kernels"],
    package_dir={"odenets_fast": "odenets_fast", "odenets_fast.triton_kernels": "triton_kernels"},
)
