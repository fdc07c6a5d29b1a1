"""cryorefine: cryo-EM single-particle refinement by regularised likelihood (RELION's MAP-EM) on PyTorch."""

__version__ = "0.1.0"
