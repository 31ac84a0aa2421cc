"""align: prove that a PaddlePaddle port computes what its PyTorch reference computes."""

__version__ = "0.1.0"
