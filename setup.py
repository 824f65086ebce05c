"""Install with `pip install -e ".[dev]"` (the Makefile does this in .venv)."""

from setuptools import find_packages, setup

setup(
    name="mixtral_jax",
    version="0.1.0",
    description="Pretrain Mixtral-style sparse Mixture-of-Experts language models in JAX/Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mixtral_jax", "mixtral_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.0",
        "safetensors>=0.4",
        "absl-py>=2.0",
        "numpy>=2.0",
        "optuna>=5.0",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch pinned: this exact CPU wheel is on the project's machines; a bare "torch"
        # would pull a multi-GB CUDA build.
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=4.46",
                # TensorBoard's own event reader, for the tests.
                "tensorboard>=2.16"],
        # TPU VMs (launch/tpu_vm.sh): libtpu.
        "tpu": ["jax[tpu]>=0.10.2"],
        # NVIDIA GPUs: jax's CUDA 13 plugin and CUDA libraries from the registry (driver >= 580);
        # `make install` adds it where `nvidia-smi -L` lists a GPU.
        "cuda": ["jax[cuda13]>=0.10.2"],
        # The same on CUDA 12 drivers (>= 525).
        "cuda12": ["jax[cuda12]>=0.10.2"],
    },
    entry_points={
        "console_scripts": ["mixtral-train=mixtral_jax.cli.train:run",
                            "mixtral-convert=mixtral_jax.cli.convert:run",
                            "mixtral-compile=mixtral_jax.cli.compile:run",
                            "mixtral-sweep=mixtral_jax.cli.sweep:run",
                            "mixtral-plot=mixtral_jax.cli.plot:run",
                            "mixtral-sample=mixtral_jax.cli.sample:run",
                            "mixtral-tokenizer=mixtral_jax.cli.tokenizer:run",
                            "mixtral-checkpoint=mixtral_jax.cli.checkpoint:run"],
    },
)
