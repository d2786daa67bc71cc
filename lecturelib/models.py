"""Small models and data the notebooks train on a laptop CPU: an MLP on scikit-learn's digits.

The digits data (1,797 8x8 images, 10 classes) ships with scikit-learn, so nothing downloads.
Checkpoints are plain state_dicts (``torch.load(path, weights_only=True)``): loaded when present,
otherwise the model is trained and saved.
Reference: Alpaydin & Kaynak, UCI optical recognition of handwritten digits (scikit-learn's copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .harness import progress

Tensor = torch.Tensor


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn digits, scaled to [0, 1], split into train and test."""

    X_train: Tensor
    """float32 (n_train, 64)."""
    y_train: Tensor
    """int64 (n_train,)."""
    X_test: Tensor
    """float32 (n_test, 64)."""
    y_test: Tensor
    """int64 (n_test,)."""


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """Load scikit-learn's digits, scale pixels from 0..16 to [0, 1], and split with a fixed seed.

    Used in: 01_linear_quantization, 05_qat_ste.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X.astype(np.float32) / 16.0, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(torch.from_numpy(X_tr), torch.from_numpy(y_tr).long(),
                       torch.from_numpy(X_te), torch.from_numpy(y_te).long())


class MLP(nn.Sequential):
    """Linear -> ReLU -> ... -> Linear. ``MLP([64, 64, 10])`` is the digits classifier."""

    def __init__(self, sizes: list[int]):
        if len(sizes) < 2 or any((not isinstance(s, int)) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be a list of at least two positive ints, got {sizes!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


@dataclass
class TrainConfig:
    """How to train a small classifier: Adam on shuffled minibatches."""

    epochs: int = 30
    """Passes over the training set."""
    lr: float = 1e-2
    """Adam learning rate."""
    batch_size: int = 64
    """Minibatch size."""
    seed: int = 0
    """Seeds the initialisation and the shuffling."""
    weight_decay: float = 0.0
    """Adam weight decay."""


def train_classifier(model: nn.Module, X: Tensor, y: Tensor, cfg: TrainConfig) -> list[float]:
    """Train ``model`` with cross-entropy; returns the mean loss of each epoch.

    Deterministic for a given cfg.seed (the shuffling uses its own generator).
    Used in: 01_linear_quantization, 05_qat_ste.
    """
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {cfg.epochs} and {cfg.batch_size}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    model.train()
    for _ in progress(range(cfg.epochs), desc=f"training {type(model).__name__}"):
        perm = torch.randperm(len(X), generator=g)
        total = 0.0
        for i in range(0, len(X), cfg.batch_size):
            idx = perm[i: i + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(X))
    model.eval()
    return history


@torch.no_grad()
def accuracy(model_or_logits: nn.Module | Tensor, X: Tensor | None, y: Tensor) -> float:
    """Top-1 accuracy: mean(argmax f(X) == y). Pass logits directly with X=None.

    Used in: 01_linear_quantization, 05_qat_ste.
    """
    logits = model_or_logits if X is None else model_or_logits(X)
    if len(logits) != len(y):
        raise ValueError(f"logits and y must have the same length, got {len(logits)} and {len(y)}")
    return float((logits.argmax(dim=1) == y).float().mean())


def load_or_train(model: nn.Module, path: str | Path, X: Tensor, y: Tensor, cfg: TrainConfig) -> bool:
    """Load ``path`` (a state_dict) into ``model`` if it exists, else train and save it there.

    Returns True when the checkpoint was loaded, False when the model was trained.
    Used in: 01_linear_quantization, 05_qat_ste.
    """
    path = Path(path)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return True
    torch.manual_seed(cfg.seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    train_classifier(model, X, y, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return False
