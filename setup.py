"""Build the Cython fast path.

Set RELAY_NO_EXT=1 to install without compiling (the pure twin is then used);
any other build failure is an error, so a broken compiler never silently
downgrades the relay to the slow path.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("RELAY_NO_EXT") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension("relay._fastpath", ["relay/_fastpath.pyx"], extra_compile_args=["-O3"]),
            Extension("relay.store._inbox", ["relay/store/_inbox.pyx"], extra_compile_args=["-O3"]),
            Extension("relay.server._io", ["relay/server/_io.pyx"], extra_compile_args=["-O3"]),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
