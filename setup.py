"""Build the optional C speedups; everything else is in pyproject.toml.

``optional=True``: where no C compiler is found the install still succeeds, and the core runs
the same frame walk in Python (``gaia_gateway.core.SPEEDUPS`` says which one is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gaia_gateway.core._speedups",
            ["src/gaia_gateway/core/_speedups.c"],
            optional=True,
        )
    ]
)
