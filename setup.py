"""Build of the optional C extension glmkit.kernels._qgemm (everything else is in pyproject.toml).

The extension is compiled for baseline x86-64 (no -march=native); its AVX2/FMA/F16C and AVX-512 code is selected
at run time (function / file target attributes, cpuid + xgetbv). If it cannot be built (no compiler, odd platform), the package installs without it and glmkit falls
back to its pure PyTorch path (glmkit.kernels.available() is then False, with the reason).
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext whose failure is a warning, not an install error."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._warn(e, ext.name)

    @staticmethod
    def _warn(e, name="glmkit.kernels._qgemm"):
        msg = (f"WARNING: could not build the optional C extension {name} ({type(e).__name__}: {e}); "
               "glmkit will use its slower pure-PyTorch path.")
        print(msg, file=sys.stderr)


def _ext():
    if os.environ.get("GLMKIT_NO_EXT"):
        return []
    if sys.platform == "win32":
        args, link = ["/O2"], []
    else:
        args = ["-O3", "-std=c11", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"]
        link = ["-pthread"]
    src = ["qgemm.c", "decode_ops.c", "qgemm_vnni.c", "qgemm_vnni_emu.c", "fgemm.c", "fgemm_avx2.c", "fgemm_avx512.c"]
    return [Extension("glmkit.kernels._qgemm", [f"glmkit/kernels/{f}" for f in src],
                      depends=[f"glmkit/kernels/{f}" for f in ("qgemm_internal.h", "qgemm_vnni.inc", "fgemm_kern.inc")],
                      extra_compile_args=args, extra_link_args=link)]


setup(ext_modules=_ext(), cmdclass={"build_ext": OptionalBuildExt})
