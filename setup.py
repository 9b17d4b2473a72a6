"""remem_jax: making strong pretrained Vision Transformers good teachers for small models."""
import setuptools

setuptools.setup(
    name="remem_jax",
    version="0.1.0",
    description=("ReMem teacher fine-tuning, WeCoLoRA and TinyMIM-style distillation of "
                 "AugReg Vision Transformers in JAX/Flax."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The top-level configs/ folder ships as the package remem_jax.configs (`--config=remem:cifar100`);
    # remem_jax/configs/__init__.py only stands in for it in a checkout.
    packages=setuptools.find_packages(include=["remem_jax", "remem_jax.*"], exclude=["remem_jax.configs"])
    + ["remem_jax.configs"],
    package_dir={"remem_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6.0",
        "ml-collections>=0.1.1",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "chex>=0.1.86",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.3",
        "matplotlib>=3.8",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "pillow>=10.0",
        # timm / Hugging Face .safetensors teachers read into NumPy (hub_checkpoints; no torch at run time).
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5",
                 # tests/test_notebooks.py executes colabs/*.ipynb and checks their jupytext pairing.
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "jupytext>=1.16",
                 # tests/test_wheel.py builds the wheel without build isolation (no download).
                 "setuptools>=70.1",
                 # tests/test_hub_checkpoints.py: the PyTorch forward of Hugging Face ViTs is the reference.
                 # Pinned exactly: the CPU build (a loose range pulls a multi-GB CUDA build). timm is not
                 # here: it needs torchvision, whose PyPI build does not import beside the CPU torch.
                 "torch==2.13.0", "transformers>=4.40"],
    },
)
