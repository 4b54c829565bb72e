"""Build the Cython hot path (ext/*.pyx) into the raftmq package.

Every module under ext/ becomes ``raftmq._<name>``: ext/codec.pyx -> raftmq._codec.
A module's cdef interface (its .pxd) lives where Cython looks for the module
``raftmq._<name>``: src/raftmq/_<name>.pxd (so other Cython code can cimport it).
There is no pure-Python fallback: the package does not import without them.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("RAFTMQ_DEBUG") == "1"



def _pxd_changed(pyx: Path) -> bool:
    """Whether the module's own .pxd is newer than its generated C.  cythonize
    tracks a module's .pxd only beside the .pyx, and ours is in src/raftmq/."""
    pxd = HERE / "src" / "raftmq" / f"_{pyx.stem}.pxd"
    c_file = pyx.with_suffix(".c")
    return pxd.exists() and (not c_file.exists()
                             or c_file.stat().st_mtime < pxd.stat().st_mtime)


ext_modules = []
for pyx in sorted((HERE / "ext").glob("*.pyx")):
    ext_modules += cythonize(
        [Extension(
            f"raftmq._{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
        )],
        include_path=["ext", "src"],
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=os.environ.get("RAFTMQ_ANNOTATE") == "1",
        force=_pxd_changed(pyx),
    )

setup(ext_modules=ext_modules)
