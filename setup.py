"""Mutual Contrastive Learning (Yang et al., AAAI 2022): a reimplementation in PyTorch.

Install for development (editable, so the entry scripts and packages stay in place):
    pip install -e ".[test]"
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements() -> list:
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="mcl",
    version="0.1.0",
    description="Mutual Contrastive Learning for Visual Representation Learning (AAAI 2022), reimplemented",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["models", "losses", "data", "utils"],
    package_data={"models": ["csrc/*.cpp"]},  # the fused BatchNorm+ReLU kernel, built on first use
    py_modules=["main_cifar", "main_imagenet", "main_moco_mcl", "main_lincls"],
    install_requires=requirements(),
    extras_require={
        "test": ["pytest>=7", "scipy>=1.9"],
        "plot": ["matplotlib>=3.5"],
    },
)
