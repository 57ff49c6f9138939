"""Build script: ships `triton_kernels/` inside the package as `odenets_fast.triton_kernels`, and
builds the C++ CPU backend from `csrc/` as the extension module `odenets_fast._C`.

The top-level name `triton_kernels` is taken (PyPI's triton-kernels, Triton's own repository),
so the folder is mapped through `package_dir` and never installed under that name.

The extension compiles against the torch installed in the environment, hence
`pip install --no-build-isolation -e .` (what the Makefile runs). It is optional: setting
ODENETS_FAST_SKIP_EXT=1 skips it, and a build that cannot run or fails prints why and how to
retry while the install goes on; the package then uses the reference backend on CPU and says so.
"""

import glob
import os
import sys

from setuptools import setup

SKIP_ENV_VAR = "ODENETS_FAST_SKIP_EXT"
BUILD_COMMAND = "pip install --no-build-isolation -e ."


def _say(message: str) -> None:
    print(f"odenets_fast setup: {message}", file=sys.stderr)


def _extension_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) that build odenets_fast._C, or empty ones when it is not built."""
    if os.environ.get(SKIP_ENV_VAR, "") not in ("", "0"):
        _say(f"{SKIP_ENV_VAR} is set: skipping the C++ extension (the 'cpp' backend)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        _say(
            f"torch is not importable at build time ({err}), so the C++ extension is not built. "
            f"Install torch, then rebuild without build isolation: {BUILD_COMMAND}"
        )
        return [], {}

    try:  # the `ninja` wheel puts its binary next to the interpreter, which may not be on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # torch then finds a system ninja, or compiles without it

    class OptionalBuildExtension(BuildExtension):
        """A failed compilation must not fail the install: the package works without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # compiler missing, compile or link error, ninja failure
                _say(
                    f"building the C++ extension failed: {err}\n"
                    f"The package installs without it and uses the reference backend on CPU. Fix the "
                    f"error above, then rebuild with: {BUILD_COMMAND}"
                )
                self.extensions = []

    cxx_flags = ["-O3"]
    # at::parallel_for is inline OpenMP code when torch uses OpenMP: it needs the flag to compile
    # parallel. Not linked: the symbols resolve to the OpenMP runtime torch itself loads.
    if torch.backends.openmp.is_available() and sys.platform != "win32":
        cxx_flags.append("-fopenmp")
    extension = CppExtension(
        "odenets_fast._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        extra_compile_args={"cxx": cxx_flags},
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    packages=["odenets_fast", "odenets_fast.triton_kernels"],
    package_dir={"odenets_fast": "odenets_fast", "odenets_fast.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
