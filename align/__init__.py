"""Prediction alignment (BiLD): train a small model to agree with a large one. Entry point: align.cli:main."""
