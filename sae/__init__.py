"""The SAE itself: model, fused kernels, trainer, formats and the `saewb` CLI."""

__version__ = "0.1.0"
