"""Experiments: configs (``config``), the trainer (``trainer``), checkpoints (``checkpoint``),
results tables (``table``), reproduction grids (``runner``) and plots (``plots``)."""
