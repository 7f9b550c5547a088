"""Build script: the Python package (flashlite + kernels/ as flashlite.kernels).

The C++ extension flashlite._C (csrc/) is added by the C++ core work; see csrc/README.md.
"""
from setuptools import setup

setup(
    packages=["flashlite", "flashlite._backends", "flashlite.nn", "flashlite.integrations", "flashlite.kernels",
              "flashlite.bench"],
    package_dir={"flashlite": "flashlite", "flashlite.kernels": "kernels", "flashlite.bench": "bench"},
)
