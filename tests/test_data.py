"""Bundled photos, folders of user images, and deterministic random crops."""

import numpy as np
import pytest
import torch
from PIL import Image

from stdet.data import EVAL_PHOTOS, TRAIN_PHOTOS, RandomCrops, bundled_images, load_folder


def test_bundled_photos_load_offline_and_the_splits_are_disjoint() -> None:
    train, evaluation = bundled_images("train"), bundled_images("eval")
    assert list(train) == list(TRAIN_PHOTOS) and list(evaluation) == list(EVAL_PHOTOS)
    assert not set(train) & set(evaluation)
    for image in [*train.values(), *evaluation.values()]:
        assert image.dtype == torch.float32 and image.shape[0] == 3 and min(image.shape[1:]) >= 256
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    with pytest.raises(ValueError, match="^split: "):
        bundled_images("test")


def test_folder_skips_unreadable_and_small_images_with_a_warning(tmp_path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8)).save(tmp_path / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 90, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="skipped 2 image"):
        loaded = load_folder(tmp_path, min_size=64)
    assert sorted(k.rsplit("/", 1)[-1] for k in loaded.images) == ["a.png", "b.jpg"]
    assert loaded.images[str(tmp_path / "sub" / "b.jpg")].shape == (3, 70, 70)  # gray becomes RGB
    assert {k.rsplit("/", 1)[-1]: v.split(" ")[0] for k, v in loaded.skipped.items()} == {
        "broken.jpg": "unreadable",
        "small.png": "smaller",
    }


def test_missing_or_empty_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="^data: .* is not a directory"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with (
        pytest.raises(ValueError, match="^data: no usable PNG/JPEG image .*1 skipped"),
        pytest.warns(UserWarning),
    ):
        load_folder(tmp_path)


def test_random_crops_are_deterministic_per_step() -> None:
    images = {
        "ramp": torch.linspace(0, 1, 3 * 40 * 50).reshape(3, 40, 50),
        "flat": torch.full((3, 33, 33), 0.5),
    }
    crops = RandomCrops(images, size=32, seed=3)
    first = crops.batch(7, 5)
    assert first.shape == (5, 3, 32, 32)
    assert torch.equal(first, RandomCrops(images, size=32, seed=3).batch(7, 5))  # no hidden state
    assert not torch.equal(first, crops.batch(8, 5))
    assert not torch.equal(first, RandomCrops(images, size=32, seed=4).batch(7, 5))
    with pytest.raises(ValueError, match="smaller than the 34-pixel crop"):
        RandomCrops(images, size=34)
