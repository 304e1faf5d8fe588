"""gpunet: feed-forward networks with hand-written matrix backpropagation on NumPy or CuPy."""
__version__ = "0.1.0"
