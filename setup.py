"""molora: mixtures of LoRA experts with layer-wise expert allocation.

One install: ``pip install torch==2.13.0 -e ".[dev]"`` (the pinned torch is the CPU wheel on
CPU-only machines; on GPU machines install your CUDA torch first).

The tensor ops live in ``kernels/molora_kernels`` and are installed as ``molora_kernels``: never as a
top-level ``kernels`` module, which transformers probes for the Hub kernels library.
"""
from setuptools import setup

setup(
    name="molora",
    version="0.2.0",
    description="Mixtures of LoRA experts with layer-wise expert allocation (MoLA) for Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["molora", "molora.tuner", "molora.allocation", "molora.run", "molora_kernels"],
    package_dir={"molora": "molora", "molora_kernels": "kernels/molora_kernels"},
    py_modules=["molora_cli"],  # the `molora` command (light import: fast errors)
    # Ranges the test suite has run against (CI installs the newest inside each). The libraries whose APIs molora
    # reaches into (transformers' Trainer and cache API, PEFT's tuner base, DeepSpeed's ZeRO hooks, accelerate)
    # are held to the tested minor release; widen a range only with a green test run on the new release.
    install_requires=[
        "torch>=2.13,<2.14",
        "transformers>=5.24,<5.25",
        "peft>=0.21,<0.22",
        "accelerate>=1.15,<1.16",
        "deepspeed>=0.19.8,<0.20",
        "safetensors>=0.8,<0.9",
        "pyyaml>=6",
        "pydantic>=2.13,<3",
        "tqdm",
        "rich",
        "matplotlib>=3.8",
        "wandb>=0.31,<0.32",
        "datasets>=5.2,<6",
        "gguf",
        "filelock>=3.10",                            # one writer per output_dir (molora.run.run_lock)
    ],
    extras_require={
        "triton": ["triton>=3.9,<3.10"],
        "quant": ["bitsandbytes>=0.50,<0.51"],       # model.load_in_4bit / load_in_8bit
        "trl": ["trl>=1.16,<1.17"],                  # SFTTrainer / DPOTrainer with peft_config=MoLoRAConfig(...)
        "lm-eval": ["lm-eval>=0.4.13,<0.5"],         # lm_eval --model hf --model_args ...,peft=ADAPTER
        # weightwatcher: the alpha-hill signal is tested against it (tests/test_allocate.py)
        "dev": ["pytest>=8", "triton>=3.9,<3.10", "bitsandbytes>=0.50,<0.51", "trl>=1.16,<1.17",
                "lm-eval>=0.4.13,<0.5", "weightwatcher>=0.7.7,<0.8"],
    },
    entry_points={"console_scripts": ["molora=molora_cli:main"]},
)
