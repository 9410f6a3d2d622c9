from setuptools import setup

setup(
    packages=["hermesflow_fast", "hermesflow_fast.ops", "hermesflow_fast.kernels"],
    package_dir={"hermesflow_fast": "hermesflow_fast", "hermesflow_fast.kernels": "kernels"},
)
