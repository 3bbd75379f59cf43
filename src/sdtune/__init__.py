"""sdtune: fine-tune Stable Diffusion with several techniques and compare them honestly."""

__version__ = "0.1.0"
