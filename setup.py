"""Build the Cython kernels in ext/ into ``calstream._native``.

Everything else about the package lives in pyproject.toml.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3"]
if os.environ.get("CALSTREAM_NATIVE_ARCH", "1") == "1":
    # The calibration nodes run what they build; CI wheels can opt out.
    compile_args.append("-march=native")

extensions = [
    Extension(
        "calstream._native",
        sources=["ext/_native.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
