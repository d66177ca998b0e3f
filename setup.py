"""aligner: model-parallel alignment toolkit on megatron-core."""
import os

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 is a build requirement (pyproject.toml); plain egg_info may lack it
    Pybind11Extension = None
    build_ext = None

here = os.path.dirname(os.path.abspath(__file__))

ext_modules = []
cmdclass = {}
if Pybind11Extension is not None and os.path.exists(os.path.join(here, "csrc", "packing.cpp")):
    ext_modules.append(
        Pybind11Extension(
            "aligner._C",
            ["csrc/packing.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )
    cmdclass["build_ext"] = build_ext

with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="aligner",
    version="0.1.0",
    description="Model-parallel toolkit for aligning large language models, on megatron-core",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # conf/ stays at the top of the repository (where a source checkout reads it) and ships
    # inside the package as the package-data module aligner.conf (Hydra: pkg://aligner.conf)
    packages=find_packages(include=["aligner", "aligner.*"]) + ["aligner.conf"],
    package_dir={"aligner.conf": "conf"},
    package_data={"aligner.conf": ["*.yaml", "*/*.yaml"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4,<2.15",
        "megatron-core>=0.13,<0.17",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "sentencepiece>=0.2,<0.3",
        "safetensors>=0.4",
        "transformers>=4.45,<6",
        "numpy>=1.24",
        "psutil>=5.9",  # megatron-core dist_checkpointing writer
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        # parquet files and Arrow folders (datasets' save_to_disk) as data sources
        "data": ["datasets>=2.14", "pyarrow>=12"],
        # import-linter: the layering contract of pyproject.toml (tests/test_layers.py; acyclic_siblings as in 2.17)
        # peft and trl: the references of the adapter and loss parity tests
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "import-linter>=2.17,<3", "datasets>=2.14", "pyarrow>=12",
                 "trl>=1.0", "peft>=0.13"],
        # benchmarks/ compare against peers: TRL's DPOTrainer
        "bench": ["trl>=1.0"],
        # Apex is not on PyPI: it ships inside the NGC PyTorch image the Dockerfile builds on.
        "gpu": ["transformer-engine[pytorch]>=1.12"],
        "wandb": ["wandb>=0.16"],
    },
    entry_points={"console_scripts": ["aligner=aligner.cli.main:main"]},
)
