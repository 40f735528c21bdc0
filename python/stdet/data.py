"""Training and evaluation images: the photos that ship inside installed wheels, or a folder.

Nothing is downloaded. The bundled set (`bundled_images`):

- train: scikit-image's astronaut, chelsea, rocket, hubble_deep_field, immunohistochemistry and
  scikit-learn's china;
- eval: scikit-image's coffee, scikit-learn's flower and matplotlib's grace_hopper.

A folder is any directory of PNG/JPEG files (searched recursively). Unreadable images, and images
smaller than the crop, are skipped with a warning and counted; an empty result is an error.
`RandomCrops` draws batches of random crops with random horizontal flips; batch `step` depends only
on the seed and `step`, so a resumed run sees the same data as an uninterrupted one.
"""

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "china")
EVAL_PHOTOS = ("coffee", "flower", "grace_hopper")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 (or gray, or RGBA) -> 3xHxW float32 in [0, 1]."""
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = array[..., :3]
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float().div_(255.0)


def _bundled(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        return np.asarray(
            Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
        )
    import skimage.data

    return getattr(skimage.data, name)()


def bundled_images(split: str) -> dict[str, torch.Tensor]:
    """The bundled photos of `split` ("train" or "eval"), name -> 3xHxW float tensor."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    names = TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS
    return {name: _to_tensor(_bundled(name)) for name in names}


@dataclass
class Images:
    """Images that passed the checks, and what was skipped and why."""

    images: dict[str, torch.Tensor]
    skipped: dict[str, str] = field(default_factory=dict)


def load_folder(path: str | Path, min_size: int = 0) -> Images:
    """Every PNG/JPEG under `path` as 3xHxW float tensors; unreadable or too small ones are skipped
    with a warning. Raises if the folder is missing or nothing usable is in it."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data: {root} is not a directory")
    loaded = Images({})
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            loaded.skipped[str(file)] = f"unreadable ({type(error).__name__})"
            continue
        if min(array.shape[:2]) < min_size:
            loaded.skipped[str(file)] = f"smaller than {min_size} pixels ({array.shape[1]}x{array.shape[0]})"
            continue
        loaded.images[str(file)] = _to_tensor(array)
    if loaded.skipped:
        warnings.warn(
            f"data: skipped {len(loaded.skipped)} image(s) in {root}: "
            + "; ".join(f"{Path(k).name}: {v}" for k, v in list(loaded.skipped.items())[:5]),
            stacklevel=2,
        )
    if not loaded.images:
        raise ValueError(f"data: no usable PNG/JPEG image in {root} ({len(loaded.skipped)} skipped)")
    return loaded


class RandomCrops:
    """Batches of random `size` x `size` crops, randomly flipped left-right, from `images`."""

    def __init__(self, images: dict[str, torch.Tensor], size: int, seed: int = 0) -> None:
        if not images:
            raise ValueError("images: expected at least one image")
        small = [name for name, image in images.items() if min(image.shape[1:]) < size]
        if small:
            raise ValueError(
                f"images: {len(small)} image(s) smaller than the {size}-pixel crop, e.g. {small[0]}"
            )
        self.images = list(images.values())
        self.size = size
        self.seed = seed

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Batch number `step`: the same for the same seed and step, whatever came before."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        crops = []
        for _ in range(batch_size):
            image = self.images[int(torch.randint(len(self.images), (1,), generator=generator))]
            _, height, width = image.shape
            top = int(torch.randint(height - self.size + 1, (1,), generator=generator))
            left = int(torch.randint(width - self.size + 1, (1,), generator=generator))
            crop = image[:, top : top + self.size, left : left + self.size]
            if bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop.flip(-1)
            crops.append(crop)
        return torch.stack(crops)
