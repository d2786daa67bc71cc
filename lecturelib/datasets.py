"""ImageFolder-style image classification data (root/<class>/<image>), e.g. Oxford-IIIT Pets laid
out locally as root/<breed>/<file>.jpg. Nothing here downloads.

Used for the paper-scale configuration of 09_dptq_catastrophic_failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
"""File endings read as images."""


def load_image_folder(root: str | Path, size: int = 32, max_per_class: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read root/<class>/<image> into X (N, 3, size, size) float32 in [0, 1], labels y, class names.

    Classes are the sorted sub-folder names (label = index); images are resized bilinearly to
    size x size and converted to RGB; files inside a class are read in sorted order.
    Paper: the data of seed 001 (an ImageFolder of natural images); torchvision's ImageFolder layout.
    Used in: 09_dptq_catastrophic_failure
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be an existing folder of class sub-folders, got {str(root)!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"root must contain class sub-folders, found none in {str(root)!r}")
    xs, ys = [], []
    for label, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for p in files[:max_per_class]:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
            xs.append(torch.from_numpy(a).permute(2, 0, 1))
            ys.append(label)
    if not xs:
        raise ValueError(f"root has no images with endings {IMAGE_EXTENSIONS}")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), classes


def make_synthetic_image_folder(root: str | Path, classes: list[str], per_class: int = 4, size: int = 16,
                                seed: int = 0) -> Path:
    """Write a small random ImageFolder (PNG files) for tests: root/<class>/<i>.png.

    Used in: 09_dptq_catastrophic_failure (tests)
    """
    from PIL import Image

    if per_class < 1 or size < 1 or not classes:
        raise ValueError(f"per_class and size must be >= 1 and classes non-empty, got {per_class}, {size}, {classes}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
