"""genalign: reward fine-tuning of text-to-image diffusion and flow-matching models."""

__version__ = "0.1.0"
