"""lightning-ood: out-of-distribution detection for image classification on PyTorch Lightning."""

__version__ = "0.1.0"
