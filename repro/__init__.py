"""repro: the shared library behind the adversarial-training reproducibility book.

Importing it is cheap and never imports torchvision (whose PyPI wheels need CUDA).
"""
__version__ = "0.1.0"
