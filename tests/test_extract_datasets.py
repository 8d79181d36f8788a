"""Dataset sources that need the extras, on data the tests write: a torchvision dataset read from its
files (the split option mapped to ``split`` or ``train``), an ImageFolder of PNGs through a model
with the transform recorded in the run key, and Hugging Face datasets saved with save_to_disk.
Run in .venv-extras by ``make test``, where a missing or broken extra fails them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckapipe import store
from ckapipe.errors import SpecError
from ckapipe.extract.datasets import load_dataset
from ckapipe.extract.runner import extract_run

pytestmark = pytest.mark.extras

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def rows(dataset, ids) -> np.ndarray:
    return next(dataset.batches([np.asarray(ids)])).numpy()


# --------------------------------------------------------------------------- torchvision datasets


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: magic (uint8, ndim), big-endian dimensions, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_a_torchvision_dataset_whose_split_is_the_train_flag(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    for prefix, pixels in images.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(pixels)) % 10)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_dataset(f"mnist:{tmp_path}?split={split}")
        assert len(data) == len(images[prefix]) and data.transform == "to_tensor"
        np.testing.assert_allclose(rows(data, [2, 0]), images[prefix][[2, 0], None] / 255, atol=1e-7)
    small = load_dataset(f"MNIST:{tmp_path}?split=test&size=14")
    assert rows(small, [1]).shape == (1, 1, 14, 14) and small.transform == "resize(14)|center_crop(14)|to_tensor"


def write_png(path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_a_torchvision_dataset_with_a_split_argument(tmp_path):
    rng = np.random.default_rng(1)
    valid = [rng.integers(0, 256, (8, 8, 3)) for _ in range(3)]
    for i, pixels in enumerate(valid):
        write_png(tmp_path / "country211" / "valid" / "AD" / f"{i}.png", pixels)
    write_png(tmp_path / "country211" / "train" / "AD" / "0.png", rng.integers(0, 256, (8, 8, 3)))
    data = load_dataset(f"country211:{tmp_path}?split=valid")
    assert len(data) == 3
    np.testing.assert_allclose(rows(data, [2, 1]), np.stack([valid[2], valid[1]]).transpose(0, 3, 1, 2) / 255, atol=1e-7)


def test_an_unknown_torchvision_dataset_name(tmp_path):
    with pytest.raises(SpecError, match=r"unknown dataset 'cifar11'; did you mean: cifar10"):
        load_dataset(f"cifar11:{tmp_path}")


# --------------------------------------------------------------------------- image folders


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of RGB PNGs, one of them wider than high; returns (root, images in ImageFolder order)."""
    rng = np.random.default_rng(2)
    images = {"cat": [rng.integers(0, 256, (8, 8, 3)) for _ in range(3)],
              "dog": [rng.integers(0, 256, (8, 12, 3)), rng.integers(0, 256, (8, 8, 3)), rng.integers(0, 256, (8, 8, 3))]}
    root = tmp_path / "images"
    ordered = []
    for label, pictures in images.items():  # ImageFolder: classes sorted, files sorted
        for i, pixels in enumerate(pictures):
            write_png(root / label / f"{i}.png", pixels)
            ordered.append(pixels)
    return root, ordered


def expected_pixels(pixels: np.ndarray, size: int, normalize: bool) -> np.ndarray:
    """Center crop of size × size (the short side is already ``size``), to [0, 1], ImageNet statistics."""
    h, w, _ = pixels.shape
    top, left = round((h - size) / 2), round((w - size) / 2)
    x = pixels[top:top + size, left:left + size] / 255
    if normalize:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)


def test_an_image_folder_through_a_model_with_its_transform_in_the_run_key(image_folder, tmp_path):
    root, images = image_folder
    cache = tmp_path / "cache"
    path = extract_run("tests.spec_factories:flat", f"imagefolder:{root}?size=8&normalize=imagenet", ["0"],
                       cache=cache, batch_size=4, progress=False)
    run = store.open_run(path)
    assert run.spec.transform == "resize(8)|center_crop(8)|to_tensor|normalize(imagenet)"
    assert run.status == store.COMPLETE and sorted(run.sample_ids()) == list(range(6))
    stored = run.layer("0")[:]
    for row, i in enumerate(run.sample_ids()):  # stored in the order seed's permutation
        np.testing.assert_allclose(stored[row], expected_pixels(images[i], 8, True).ravel(), rtol=1e-5, atol=1e-6)
    plain = store.open_run(extract_run("tests.spec_factories:flat", f"imagefolder:{root}?size=8", ["0"],
                                       cache=cache, batch_size=4, progress=False))
    assert plain.spec.transform == "resize(8)|center_crop(8)|to_tensor" and plain.key != run.key
    i = plain.sample_ids()[0]
    np.testing.assert_allclose(plain.layer("0")[0], expected_pixels(images[i], 8, False).ravel(), rtol=1e-6)


def test_an_image_folder_with_a_transform_callable(image_folder):
    root, images = image_folder
    data = load_dataset(f"imagefolder:{root}?transform=tests.spec_factories:gray_tensor")
    assert data.transform == "callable(tests.spec_factories:gray_tensor)"
    np.testing.assert_allclose(rows(data, [1])[0, 0], images[1].mean(axis=2) / 255, rtol=1e-6)


def test_an_image_folder_that_is_not_there(tmp_path):
    with pytest.raises(SpecError, match=r"cannot read image folder .*nowhere"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


# --------------------------------------------------------------------------- Hugging Face datasets


def test_a_saved_hugging_face_dataset_dict_by_split_and_columns(tmp_path):
    import datasets

    def table(n, start):
        return datasets.Dataset.from_dict({"x": [[start + i, start + i + 0.5] for i in range(n)],
                                           "tokens": [[start + i] * (1 + i % 3) for i in range(n)],
                                           "label": [i % 2 for i in range(n)]})

    datasets.DatasetDict({"train": table(6, 0), "test": table(4, 100)}).save_to_disk(str(tmp_path / "dd"))
    test = load_dataset(f"hf:{tmp_path / 'dd'}?split=test")
    assert len(test) == 4 and test.transform == "none"
    batch = next(test.batches([np.array([2, 0])]))
    assert set(batch) == {"x", "tokens"}  # the label is not an input
    torch.testing.assert_close(batch["x"], torch.tensor([[102.0, 102.5], [100.0, 100.5]]))
    assert batch["tokens"].tolist() == [[102, 102, 102], [100, 0, 0]]  # padded per batch
    only_x = next(load_dataset(f"hf:{tmp_path / 'dd'}?split=train&columns=x").batches([np.array([5])]))
    assert list(only_x) == ["x"] and only_x["x"].tolist() == [[5.0, 5.5]]
    with pytest.raises(SpecError, match=r"has splits train, test: choose one with \?split=NAME"):
        load_dataset(f"hf:{tmp_path / 'dd'}")
    with pytest.raises(SpecError, match=r"cannot load Hugging Face dataset from .*nowhere .*save it with save_to_disk"):
        load_dataset(f"hf:{tmp_path / 'nowhere'}")


def test_a_saved_hugging_face_dataset_of_images_gets_the_image_transform(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = [rng.integers(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(4)]
    data = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 0, 1]},
                                      features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    data.save_to_disk(str(tmp_path / "pictures"))
    loaded = load_dataset(f"hf:{tmp_path / 'pictures'}?size=8&normalize=imagenet")
    assert loaded.transform == "resize(8)|center_crop(8)|to_tensor|normalize(imagenet)"
    batch = next(loaded.batches([np.array([3])]))
    np.testing.assert_allclose(batch["image"][0].numpy(), expected_pixels(pixels[3], 8, True), rtol=1e-5, atol=1e-6)
