"""Data, one module per thing it holds:

- :mod:`gpunet.data.arrays`: arrays in, the front door: features and targets as the network's dtype
  and device (``features``, ``targets``);
- :mod:`gpunet.data.rows`: features read by row index, batch by batch (``Rows``; ``Pixels``, uint8
  images read as floats);
- :mod:`gpunet.data.datasets`: data sets on disk: MNIST's four files (find, download, load), a
  validation split, ``.npz`` and CSV files of one's own;
- :mod:`gpunet.data.idx`: the IDX file format (MNIST's);
- :mod:`gpunet.data.pictures`: pictures (image files) made into MNIST-style inputs for prediction.

Data problems raise :class:`DataError`, naming the file or argument.
"""


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file and the
    problem."""


# After DataError: the modules below import it from here.
from .datasets import (  # noqa: E402
    MNIST_FILES,
    download_mnist,
    load_arrays,
    load_mnist,
    split_validation,
)

__all__ = [
    "DataError",
    "MNIST_FILES",
    "download_mnist",
    "load_arrays",
    "load_mnist",
    "split_validation",
]
