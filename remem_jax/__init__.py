"""remem_jax: strong pretrained ViTs as teachers for small production models."""

__version__ = "0.1.0"
