"""Build script for the optional C accelerator; everything else is in pyproject.toml.

``optional=True``: where it cannot be compiled (no compiler, an interpreter
without the C API), ipcbus installs without it and uses its pure-Python twin.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ipcbus._speedups",
            ["ipcbus/_speedups.c", "ipcbus/_roundtrip.c", "ipcbus/_msgpack_pack.c", "ipcbus/_msgpack_unpack.c"],
            depends=["ipcbus/_speedups.h"],
            optional=True,
        )
    ]
)
