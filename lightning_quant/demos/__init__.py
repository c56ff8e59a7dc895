"""Float demo models and offline data sets for the examples, the Hydra app and the tests.

Nothing here imports the quantization code: the demos are the "user's model" that the callbacks act on.
"""

from lightning_quant.demos.data import DigitsDataModule, MNIST5kDataModule
from lightning_quant.demos.models import DemoCNN, DemoMLP

__all__ = ["DemoCNN", "DemoMLP", "DigitsDataModule", "MNIST5kDataModule"]
