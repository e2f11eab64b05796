"""dirl: post-training for blockwise diffusion language models."""
__version__ = "0.1.0"
