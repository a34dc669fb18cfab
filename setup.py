"""Package layout. The kernels/ folder is installed as `zeroc_kernels`: the top-level name `kernels` belongs
to Hugging Face's `kernels` distribution, which transformers >= 5.25 imports."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["zeroc", "zeroc.*", "prefill_service", "decode_service", "kv_store"])
    + ["zeroc_kernels"],
    package_dir={"zeroc_kernels": "kernels"},
    # the ragged CPU attention kernel's source, compiled on first use (zeroc_kernels/ragged_cpu.py)
    package_data={"zeroc_kernels": ["csrc/*.cpp"]},
)
