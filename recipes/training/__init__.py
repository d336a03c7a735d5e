"""Training LoFTR: ground truth from depth/pose or homographies, the paper's losses, data sources and a trainer.

``python -m recipes.train_loftr`` is the command-line entry point; see :mod:`recipes.training.trainer`.
"""
