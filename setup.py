"""molora: mixtures of LoRA experts with layer-wise expert allocation.

One install: ``pip install torch==2.13.0 -e ".[dev]"`` (the pinned torch is the CPU wheel on
CPU-only machines; on GPU machines install your CUDA torch first).

The tensor ops live in ``kernels/molora_kernels`` and are installed as ``molora_kernels``: never as a
top-level ``kernels`` module, which transformers probes for the Hub kernels library.
"""
from setuptools import setup

setup(
    name="molora",
    version="0.1.0",
    description="Mixtures of LoRA experts with layer-wise expert allocation (MoLA) for Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["molora", "molora_kernels"],
    package_dir={"molora": "molora", "molora_kernels": "kernels/molora_kernels"},
    py_modules=["molora_cli"],  # the `molora` command (light import: fast errors)
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "peft>=0.17",
        "accelerate>=1.0",
        "safetensors",
        "pyyaml",
        "pydantic>=2",
        "tqdm",
        "rich",
        "matplotlib",
        "wandb",
        "datasets",
        "gguf",
        "deepspeed>=0.16",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": ["pytest", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["molora=molora_cli:main"]},
)
