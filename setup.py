"""Mutual Contrastive Learning (Yang et al., AAAI 2022): a reimplementation in PyTorch.

    pip install -e ".[test]"

installs the dependencies (and the test extra; the optional extras timm, wandb and yaml add
timm networks, the Weights & Biases logger and YAML config files). The project runs from its checkout, as
the original does: the entry scripts import ``models``, ``losses``, ``data`` and ``utils``
from the folder they sit in. Those generic names are deliberately NOT installed into
site-packages, where they would collide with other projects' packages of the same names
(the original's own ``models`` package among them).
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
    packages=[],  # see the docstring: the code runs from the checkout
    py_modules=[],
    install_requires=requirements(),
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "scipy>=1.9"],
        "plot": ["matplotlib>=3.5"],
        "timm": ["timm>=0.9"],  # --arch timm:NAME
        "wandb": ["wandb>=0.15"],  # the Weights & Biases logger
        "yaml": ["pyyaml>=5.1"],  # --config FILE.yaml
    },
)
