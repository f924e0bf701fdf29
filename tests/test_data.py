"""Tests for pspc_jax.data: every source format round-trips, every bad input raises DatasetError."""

import hashlib
import io
import json
import os
import pathlib
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

from pspc_jax import data
from pspc_jax.data import DatasetError, load_dataset

SHARED_CIFAR_ZIP = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
                    "cifar10-train-32x32-jpeg.zip")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  """Keeps the default cache directory inside the test's tmp_path."""
  monkeypatch.setenv("PSPC_JAX_CACHE", str(tmp_path / "default-cache"))


def _random_images(num=10, height=6, width=5, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (num, height, width, channels), dtype=np.uint8)


def _labels(num=10):
  return np.arange(num, dtype=np.int64) * 7 % 10


def _smooth_images(num=10, size=16, seed=0):
  """RGB images with gentle gradients: JPEG reproduces them closely."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  base = rng.uniform(60, 190, (num, 1, 1, 3))
  slope = rng.uniform(-50, 50, (num, 1, 1, 3, 2))
  images = base + slope[..., 0] * yy[None, :, :, None] + slope[..., 1] * xx[None, :, :, None]
  return np.rint(images).astype(np.uint8)


def _encode(image, fmt="PNG", **kwargs):
  array = image[..., 0] if image.shape[-1] == 1 else image
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _edm_names(num, ext="png"):
  return [f"{i // 4:05d}/img{i:08d}.{ext}" for i in range(num)]


def _dataset_json(names, labels):
  if labels is None:
    return json.dumps({"labels": None})
  return json.dumps({"labels": [[n, int(l)] for n, l in zip(names, labels)]})


def _write_zip(path, images, labels=None, fmt="PNG", ext="png", **kwargs):
  names = _edm_names(len(images), ext)
  # Written in reverse so the loader's sorting is exercised.
  with zipfile.ZipFile(path, "w") as archive:
    for name, image in reversed(list(zip(names, images))):
      archive.writestr(name, _encode(image, fmt, **kwargs))
    archive.writestr("dataset.json", _dataset_json(names, labels))
  return path


def _write_folder(path, images, labels=None, with_json=True):
  names = _edm_names(len(images))
  for name, image in zip(names, images):
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_bytes(_encode(image))
  if with_json:
    (path / "dataset.json").write_text(_dataset_json(names, labels))
  return path


def _cifar_batch(images, labels):
  """A CIFAR-10 batch dict in the original layout: CHW-flattened uint8 rows."""
  rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
  return {b"batch_label": b"training batch", b"labels": [int(l) for l in labels], b"data": rows,
          b"filenames": [b"x.png"] * len(images)}


def _py2_string(raw):
  """A Python 2 ``str`` (SHORT_BINSTRING/BINSTRING opcode); unpickles as bytes."""
  if len(raw) < 256:
    return b"U" + bytes([len(raw)]) + raw
  return b"T" + struct.pack("<i", len(raw)) + raw


def _py2_cifar_pickle(images, labels):
  """A CIFAR-10 batch pickled the way the real archive is: Python 2, NumPy 1 global names."""
  rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_string(b"b")
           + b"\x87R(K\x01" + b"".join(b"M" + struct.pack("<H", d) for d in rows.shape)
           + b"\x86cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R(K\x03"
           + _py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
           + _py2_string(rows.tobytes()) + b"tb")
  label_list = b"](" + b"".join(b"K" + bytes([int(l)]) for l in labels) + b"e"
  return (b"\x80\x02}(" + _py2_string(b"batch_label") + _py2_string(b"training batch")
          + _py2_string(b"labels") + label_list + _py2_string(b"data") + array + b"u.")


def _cifar_parts(images, labels, py2=True):
  """Pickled data_batch_1..5 (plus the extra files of the real archive), keyed by file name."""
  parts = {}
  for i, (batch_images, batch_labels) in enumerate(zip(np.array_split(images, 5),
                                                       np.array_split(labels, 5))):
    if py2:
      parts[f"data_batch_{i + 1}"] = _py2_cifar_pickle(batch_images, batch_labels)
    else:
      batch = _cifar_batch(batch_images, batch_labels)
      parts[f"data_batch_{i + 1}"] = pickle.dumps(batch, protocol=2)
  parts["test_batch"] = pickle.dumps(_cifar_batch(images[:2], labels[:2]), protocol=2)
  parts["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
  return parts


def _write_cifar_tar(path, images, labels, mode="w:gz"):
  parts = _cifar_parts(images, labels)
  order = ["data_batch_4", "test_batch", "data_batch_3", "batches.meta", "data_batch_2",
           "data_batch_5", "data_batch_1"]  # Scrambled, like the real archive.
  target = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": path}
  with tarfile.open(mode=mode, **target) as archive:
    for name in order:
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(parts[name])
      archive.addfile(info, io.BytesIO(parts[name]))
  return path


def _cifar_images(num=10, seed=0):
  return _random_images(num, 32, 32, 3, seed), _labels(num)


# --------------------------------------------------------------------------------------------------
# Sources.


def test_digits():
  from sklearn.datasets import load_digits

  dataset = load_dataset("digits")
  assert dataset.images.shape == (1797, 8, 8, 1)
  assert dataset.images.dtype == np.uint8 and dataset.images.flags.c_contiguous
  assert dataset.images.min() == 0 and dataset.images.max() == 255
  assert dataset.num_images == 1797 and dataset.image_shape == (8, 8, 1)
  assert dataset.name == "digits"
  reference = load_digits()
  np.testing.assert_array_equal(dataset.images[..., 0],
                                np.rint(reference.images * 255 / 16).astype(np.uint8))
  assert dataset.labels.dtype == np.int64
  np.testing.assert_array_equal(dataset.labels, reference.target)
  assert set(dataset.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_zip_round_trip(tmp_path, channels):
  images, labels = _random_images(channels=channels), _labels()
  dataset = load_dataset(str(_write_zip(tmp_path / "set.zip", images, labels)))
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert dataset.labels.dtype == np.int64
  assert dataset.name == "set"


def test_zip_with_null_labels_and_no_json(tmp_path):
  images = _random_images()
  assert load_dataset(_write_zip(tmp_path / "a.zip", images, None)).labels is None
  with zipfile.ZipFile(tmp_path / "b.zip", "w") as archive:
    for i, image in enumerate(images):
      archive.writestr(f"deep/er/{i:03d}.png", _encode(image))
    archive.writestr("readme.txt", "not an image")
    archive.writestr("__MACOSX/deep/._000.png", b"resource fork junk")
  dataset = load_dataset(tmp_path / "b.zip")
  np.testing.assert_array_equal(dataset.images, images)
  assert dataset.labels is None


def test_jpeg_zip_is_close(tmp_path):
  images = _smooth_images()
  dataset = load_dataset(_write_zip(tmp_path / "jpeg.zip", images, _labels(), fmt="JPEG",
                                    ext="jpg", quality=95))
  assert dataset.images.shape == images.shape and dataset.images.dtype == np.uint8
  error = np.abs(dataset.images.astype(np.float64) - images).mean()
  assert error < 2.0, error
  np.testing.assert_array_equal(dataset.labels, _labels())


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_round_trip(tmp_path, channels):
  images, labels = _random_images(channels=channels, seed=channels), _labels()
  folder = _write_folder(tmp_path / "folder", images, labels)
  (folder / "notes.txt").write_text("ignored")
  (folder / ".hidden.png").write_bytes(b"ignored: hidden")
  dataset = load_dataset(str(folder))
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert dataset.name == "folder"


def test_plain_folder_without_labels(tmp_path):
  images = _random_images()
  folder = _write_folder(tmp_path / "plain", images, with_json=False)
  dataset = load_dataset(folder)
  np.testing.assert_array_equal(dataset.images, images)
  assert dataset.labels is None


def test_image_modes(tmp_path):
  rgb = _random_images(2, channels=3, seed=1)
  gray = _random_images(1, channels=1, seed=2)
  folder = tmp_path / "modes"
  folder.mkdir()
  (folder / "a_rgb.png").write_bytes(_encode(rgb[0]))
  (folder / "b_gray.png").write_bytes(_encode(gray[0]))
  rgba = np.concatenate([rgb[1], np.full((6, 5, 1), 17, np.uint8)], axis=-1)
  (folder / "c_rgba.png").write_bytes(_encode(rgba))
  dataset = load_dataset(folder)  # Mixed grayscale and RGB: promoted to RGB, alpha dropped.
  assert dataset.images.shape == (3, 6, 5, 3)
  np.testing.assert_array_equal(dataset.images[0], rgb[0])
  np.testing.assert_array_equal(dataset.images[1], np.repeat(gray[0], 3, axis=-1))
  np.testing.assert_array_equal(dataset.images[2], rgb[1])

  palette = tmp_path / "palette"
  palette.mkdir()
  gray_palette = Image.fromarray(gray[0, ..., 0]).convert("P")
  gray_palette.putpalette([v for i in range(256) for v in (i, i, i)])
  gray_palette.save(palette / "p.png")
  dataset = load_dataset(palette)  # A grayscale palette: the whole set is grayscale.
  assert dataset.images.shape == (1, 6, 5, 1)
  np.testing.assert_array_equal(dataset.images[0], gray[0])


def test_sixteen_bit_png_is_scaled(tmp_path):
  folder = tmp_path / "deep"
  folder.mkdir()
  values = np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000
  Image.fromarray(values).save(folder / "a.png")
  dataset = load_dataset(folder)
  np.testing.assert_array_equal(dataset.images[0, ..., 0], np.rint(values / 257).astype(np.uint8))


def test_py2_pickle_matches_python3_pickle():
  images, labels = _cifar_images(3)
  old = pickle.loads(_py2_cifar_pickle(images, labels), encoding="bytes")
  new = pickle.loads(pickle.dumps(_cifar_batch(images, labels)))
  np.testing.assert_array_equal(old[b"data"], new[b"data"])
  assert old[b"labels"] == new[b"labels"]


def test_cifar_tar_and_extracted_folder(tmp_path):
  images, labels = _cifar_images()
  archive = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", images, labels)
  dataset = load_dataset(str(archive))
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert dataset.name == "cifar-10-python"
  partial = load_dataset(archive, max_images=3)
  np.testing.assert_array_equal(partial.images, images[:3])
  np.testing.assert_array_equal(partial.labels, labels[:3])

  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for name, payload in _cifar_parts(images, labels, py2=False).items():  # Re-pickled by Python 3.
    (folder / name).write_bytes(payload)
  dataset = load_dataset(folder)
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  np.testing.assert_array_equal(load_dataset(folder, max_images=5).images, images[:5])


@pytest.mark.parametrize("name,mode", [("cifar.tgz", "w:gz"), ("cifar.tar", "w")])
def test_cifar_tar_suffixes(tmp_path, name, mode):
  images, labels = _cifar_images(seed=4)
  dataset = load_dataset(_write_cifar_tar(tmp_path / name, images, labels, mode))
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert dataset.name == "cifar"


def test_named_cifar10_uses_cache_without_network(tmp_path, monkeypatch):
  images, labels = _cifar_images()
  cache = tmp_path / "cache"
  cache.mkdir()
  _write_cifar_tar(cache / data.CIFAR10_FILENAME, images, labels)
  monkeypatch.setattr(urllib.request, "urlopen", _fail_if_called)
  dataset = load_dataset("cifar10", cache_dir=str(cache))
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert dataset.name == "cifar10"


def test_npz_variants(tmp_path):
  images, labels = _random_images(), _labels()
  np.savez(tmp_path / "a.npz", images=images, labels=labels)
  dataset = load_dataset(tmp_path / "a.npz")
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert dataset.name == "a"

  np.savez(tmp_path / "b.npz", x=images[..., 0], y=labels.astype(np.int32))  # (N, H, W): C = 1.
  dataset = load_dataset(tmp_path / "b.npz")
  np.testing.assert_array_equal(dataset.images, images[..., :1])
  np.testing.assert_array_equal(dataset.labels, labels)

  np.savez(tmp_path / "c.npz", whatever=images)
  dataset = load_dataset(tmp_path / "c.npz", max_images=4)
  np.testing.assert_array_equal(dataset.images, images[:4])
  assert dataset.labels is None


def test_float_and_rgba_arrays(tmp_path):
  images = _random_images()
  floats = images.astype(np.float32) / 127.5 - 1.0
  np.savez(tmp_path / "f.npz", images=floats)
  np.testing.assert_array_equal(load_dataset(tmp_path / "f.npz").images, images)
  rgba = np.concatenate([images, np.zeros_like(images[..., :1])], axis=-1)
  np.save(tmp_path / "rgba.npy", rgba)
  np.testing.assert_array_equal(load_dataset(tmp_path / "rgba.npy").images, images)


@pytest.mark.parametrize("channels", [1, 3])
def test_npy_round_trip(tmp_path, channels):
  images = _random_images(channels=channels)
  np.save(tmp_path / "images.npy", images)
  dataset = load_dataset(str(tmp_path / "images.npy"))
  np.testing.assert_array_equal(dataset.images, images)
  assert dataset.labels is None and dataset.name == "images"
  assert type(dataset.images) is np.ndarray and dataset.images.flags.writeable  # Not a memmap.
  partial = load_dataset(tmp_path / "images.npy", max_images=3)
  np.testing.assert_array_equal(partial.images, images[:3])


def test_flip_and_max_images(tmp_path):
  images, labels = _random_images(), _labels()
  np.savez(tmp_path / "set.npz", images=images, labels=labels)
  dataset = load_dataset(tmp_path / "set.npz", flip=True)
  assert dataset.num_images == 20 and dataset.name == "set+flip"
  np.testing.assert_array_equal(dataset.images[:10], images)
  np.testing.assert_array_equal(dataset.images[10:], images[:, :, ::-1])
  np.testing.assert_array_equal(dataset.images[13, 2, 0], images[3, 2, 4])
  np.testing.assert_array_equal(dataset.labels, np.concatenate([labels, labels]))

  limited = load_dataset(tmp_path / "set.npz", flip=True, max_images=4)  # Limit, then flip.
  assert limited.num_images == 8
  np.testing.assert_array_equal(limited.images, np.concatenate([images[:4], images[:4, :, ::-1]]))
  np.testing.assert_array_equal(limited.labels, np.concatenate([labels[:4], labels[:4]]))
  assert load_dataset(tmp_path / "set.npz", max_images=1000).num_images == 10

  digits = load_dataset("digits", max_images=5, flip=True)
  assert digits.images.shape == (10, 8, 8, 1) and digits.name == "digits+flip"

  zipped = load_dataset(_write_zip(tmp_path / "z.zip", images, labels), max_images=3)
  np.testing.assert_array_equal(zipped.images, images[:3])
  np.testing.assert_array_equal(zipped.labels, labels[:3])


def test_add_flips():
  images = _random_images(3, 2, 4, 1)
  flipped = data.add_flips(images)
  assert flipped.shape == (6, 2, 4, 1) and flipped.flags.c_contiguous
  np.testing.assert_array_equal(flipped[3:, :, 0], images[:, :, 3])
  with pytest.raises(DatasetError, match="shape"):
    data.add_flips(images[0])


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
  images, labels = _random_images(40, seed=3), _labels(40)
  archive = _write_zip(tmp_path / "many.zip", images, labels)
  monkeypatch.setattr(data, "_PARALLEL_MIN_PIXELS", 0)
  monkeypatch.setattr(data, "_DECODE_CHUNK", 3)
  monkeypatch.setattr(os, "cpu_count", lambda: 4)
  dataset = load_dataset(archive)
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  with zipfile.ZipFile(archive, "a") as handle:  # Sorts after every good image.
    handle.writestr("00009/zzz.png", b"garbage")
  with pytest.raises(DatasetError, match="zzz.png"):
    load_dataset(archive)


# --------------------------------------------------------------------------------------------------
# Errors.


def test_missing_file(tmp_path):
  missing = tmp_path / "nowhere" / "missing.zip"
  with pytest.raises(DatasetError, match="not found") as info:
    load_dataset(str(missing))
  assert str(missing) in str(info.value)


def test_unknown_name():
  with pytest.raises(DatasetError) as info:
    load_dataset("imagenet64")
  message = str(info.value)
  assert "imagenet64" in message and "'digits'" in message and "'cifar10'" in message


def test_unknown_extension(tmp_path):
  (tmp_path / "images.txt").write_text("hello")
  with pytest.raises(DatasetError, match="unknown dataset format") as info:
    load_dataset(tmp_path / "images.txt")
  assert "images.txt" in str(info.value)


def test_corrupt_image_in_folder(tmp_path):
  folder = _write_folder(tmp_path / "folder", _random_images(), with_json=False)
  bad = folder / "00001" / "img00000005.png"
  bad.write_bytes(b"\x89PNG but not really")
  with pytest.raises(DatasetError, match="not a recognized image") as info:
    load_dataset(folder)
  assert str(bad) in str(info.value)


def test_truncated_jpeg_in_zip(tmp_path):
  good = _encode(_smooth_images(1)[0], "JPEG")
  with zipfile.ZipFile(tmp_path / "t.zip", "w") as archive:
    archive.writestr("a.jpg", good)
    archive.writestr("b.jpg", good[:len(good) // 2])
  with pytest.raises(DatasetError, match="b.jpg") as info:
    load_dataset(tmp_path / "t.zip")
  assert "t.zip" in str(info.value)


def test_mixed_sizes(tmp_path):
  folder = _write_folder(tmp_path / "folder", _random_images(), with_json=False)
  odd = folder / "00001" / "img00000006.png"
  odd.write_bytes(_encode(_random_images(1, 7, 5)[0]))
  with pytest.raises(DatasetError, match="same size") as info:
    load_dataset(folder)
  assert str(odd) in str(info.value) and "5x7" in str(info.value)


def test_empty_sources(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images here")
  with pytest.raises(DatasetError, match="contains no images") as info:
    load_dataset(empty)
  assert str(empty) in str(info.value)
  with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
    archive.writestr("dataset.json", "{}")
  with pytest.raises(DatasetError, match="contains no images"):
    load_dataset(tmp_path / "empty.zip")
  np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4, 3), np.uint8))
  with pytest.raises(DatasetError, match="contains no images"):
    load_dataset(tmp_path / "empty.npy")


def test_bad_arrays(tmp_path):
  images = _random_images()
  np.save(tmp_path / "big.npy", images.astype(np.float32))  # [0, 255] floats.
  with pytest.raises(DatasetError, match=r"must be in \[-1, 1\]") as info:
    load_dataset(tmp_path / "big.npy")
  assert "big.npy" in str(info.value)
  np.save(tmp_path / "nchw.npy", _random_images(4, 8, 8, 3).transpose(0, 3, 1, 2))
  with pytest.raises(DatasetError, match="NCHW") as info:
    load_dataset(tmp_path / "nchw.npy")
  assert "nchw.npy" in str(info.value)
  np.save(tmp_path / "vector.npy", np.zeros(5, np.uint8))
  with pytest.raises(DatasetError, match="vector.npy"):
    load_dataset(tmp_path / "vector.npy")
  np.savez(tmp_path / "two.npz", a=images, b=images)
  with pytest.raises(DatasetError, match="'images'"):
    load_dataset(tmp_path / "two.npz")
  np.savez(tmp_path / "labels.npz", images=images, labels=np.arange(3))
  with pytest.raises(DatasetError, match="labels must be 10 integers"):
    load_dataset(tmp_path / "labels.npz")
  np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(DatasetError, match="objects.npy"):
    load_dataset(tmp_path / "objects.npy")


def test_bad_archives(tmp_path):
  (tmp_path / "junk.zip").write_bytes(b"not a zip")
  with pytest.raises(DatasetError, match="not a readable zip") as info:
    load_dataset(tmp_path / "junk.zip")
  assert "junk.zip" in str(info.value)
  (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
  with pytest.raises(DatasetError, match="junk.tar.gz"):
    load_dataset(tmp_path / "junk.tar.gz")
  with tarfile.open(tmp_path / "partial.tar.gz", "w:gz") as archive:
    payload = _cifar_parts(*_cifar_images())["data_batch_1"]
    info_ = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info_.size = len(payload)
    archive.addfile(info_, io.BytesIO(payload))
  with pytest.raises(DatasetError, match="missing CIFAR-10 training batches data_batch_2"):
    load_dataset(tmp_path / "partial.tar.gz")


def test_pickles_cannot_run_code(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  (folder / "data_batch_1").write_bytes(pickle.dumps(Evil()))
  with pytest.raises(DatasetError, match="data_batch_1"):
    load_dataset(folder)


def test_bad_labels_json(tmp_path):
  images = _random_images()
  folder = _write_folder(tmp_path / "folder", images, _labels())
  meta = json.loads((folder / "dataset.json").read_text())
  (folder / "dataset.json").write_text(json.dumps({"labels": meta["labels"][:-1]}))
  with pytest.raises(DatasetError, match="no label for 00002/img00000009.png") as info:
    load_dataset(folder)
  assert "dataset.json" in str(info.value)
  (folder / "dataset.json").write_text("{broken")
  with pytest.raises(DatasetError, match="not valid JSON"):
    load_dataset(folder)


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_image_listed_twice_in_dataset_json(tmp_path, kind):
  images, labels = _random_images(4), _labels(4)
  names = _edm_names(4)
  repeated = [[n, int(l)] for n, l in zip(names, labels)]

  def load(entries):
    text = json.dumps({"labels": entries})
    if kind == "zip":
      with zipfile.ZipFile(tmp_path / "set.zip", "w") as archive:
        for name, image in zip(names, images):
          archive.writestr(name, _encode(image))
        archive.writestr("dataset.json", text)
      return load_dataset(tmp_path / "set.zip")
    folder = _write_folder(tmp_path / "folder", images, labels)
    (folder / "dataset.json").write_text(text)
    return load_dataset(folder)

  # The same label twice says nothing new: accepted.
  np.testing.assert_array_equal(load(repeated + [repeated[2]]).labels, labels)
  # Different labels: refused, naming the image (before, the last label silently won).
  with pytest.raises(DatasetError, match=f"{names[2]} is listed twice, with labels "
                                         f"{int(labels[2])} and {int(labels[2]) + 1}"):
    load(repeated + [[names[2], int(labels[2]) + 1]])


def test_replaced_archive_with_the_same_size_and_mtime_is_decoded_again(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_CACHE_MIN_IMAGES", 1)
  archive, cache = tmp_path / "set.zip", tmp_path / "cache"
  first, second = _random_images(seed=1), _random_images(seed=2)
  # Uncompressed PNGs in a stored zip: the archive's size depends only on the image sizes.
  _write_zip(archive, first, None, compress_level=0)
  stat = archive.stat()
  np.testing.assert_array_equal(load_dataset(archive, cache_dir=cache).images, first)
  _write_zip(archive, second, None, compress_level=0)
  os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert archive.stat().st_size == stat.st_size and archive.stat().st_mtime_ns == stat.st_mtime_ns
  np.testing.assert_array_equal(load_dataset(archive, cache_dir=cache).images, second)
  assert len(list((cache / "decoded").iterdir())) == 2  # the old entry was replaced


@pytest.mark.parametrize("max_images", [0, -1, 2.5])
def test_bad_max_images(max_images):
  with pytest.raises(DatasetError, match="max_images"):
    load_dataset("digits", max_images=max_images)


def test_dataset_validation():
  with pytest.raises(DatasetError, match="uint8"):
    data.Dataset(images=np.zeros((2, 3, 3, 1), np.float32), labels=None, name="x")
  with pytest.raises(DatasetError, match="labels"):
    data.Dataset(images=np.zeros((2, 3, 3, 1), np.uint8), labels=np.zeros(3, np.int64), name="x")


# --------------------------------------------------------------------------------------------------
# Download.


def _fail_if_called(*args, **kwargs):
  raise AssertionError("urlopen must not be called")


def _fake_tar_bytes():
  images, labels = _cifar_images(5)
  buffer = io.BytesIO()
  _write_cifar_tar(buffer, images, labels)
  return buffer.getvalue(), images, labels


def test_download_offline(tmp_path, monkeypatch):
  def offline(url, timeout=None):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  cache = tmp_path / "cache"
  with pytest.raises(DatasetError, match="offline") as info:
    data.download_cifar10(str(cache))
  message = str(info.value)
  assert str(cache / data.CIFAR10_FILENAME) in message and "--dataset" in message
  assert list(cache.iterdir()) == []
  with pytest.raises(DatasetError, match="offline"):  # The named source tries the download.
    load_dataset("cifar10", cache_dir=cache)


def test_download_checksum_mismatch(tmp_path, monkeypatch):
  monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"x" * 5000))
  cache = tmp_path / "cache"
  with pytest.raises(DatasetError, match="MD5"):
    data.download_cifar10(cache)
  assert list(cache.iterdir()) == []


def test_download_success_then_cached(tmp_path, monkeypatch):
  payload, images, labels = _fake_tar_bytes()
  monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
  calls = []

  def serve(url, timeout=None):
    calls.append((url, timeout))
    return io.BytesIO(payload)

  monkeypatch.setattr(urllib.request, "urlopen", serve)
  cache = tmp_path / "cache"
  dataset = load_dataset("cifar10", cache_dir=cache)
  path = cache / data.CIFAR10_FILENAME
  assert path.read_bytes() == payload and len(calls) == 1
  assert calls[0][0] == data.CIFAR10_URL and calls[0][1] is not None
  np.testing.assert_array_equal(dataset.images, images)
  np.testing.assert_array_equal(dataset.labels, labels)
  assert sorted(p.name for p in cache.iterdir()) == [data.CIFAR10_FILENAME]  # No temp files.
  monkeypatch.setattr(urllib.request, "urlopen", _fail_if_called)
  assert data.download_cifar10(cache) == path


def test_download_returns_verified_file_without_network(tmp_path, monkeypatch):
  payload, _, _ = _fake_tar_bytes()
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / data.CIFAR10_FILENAME).write_bytes(payload)
  monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
  monkeypatch.setattr(urllib.request, "urlopen", _fail_if_called)
  assert data.download_cifar10(str(cache)) == cache / data.CIFAR10_FILENAME
  monkeypatch.setenv("PSPC_JAX_CACHE", str(cache))
  assert data.download_cifar10() == cache / data.CIFAR10_FILENAME


# --------------------------------------------------------------------------------------------------
# Decoded-archive cache.


def test_decoded_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_CACHE_MIN_IMAGES", 1)
  images, labels = _random_images(), _labels()
  archive = _write_zip(tmp_path / "set.zip", images, labels)
  cache = tmp_path / "cache"
  load_dataset(archive, cache_dir=cache, max_images=5)  # Partial loads never write.
  assert not (cache / "decoded").exists()
  load_dataset(archive, cache_dir=cache)
  entries = sorted(p.name for p in (cache / "decoded").iterdir())
  assert len(entries) == 2 and all(not name.startswith(".") for name in entries)

  def no_decoding(*args):
    raise AssertionError("decoded again")

  with monkeypatch.context() as patch:
    patch.setattr(data, "_decode_image", no_decoding)
    dataset = load_dataset(archive, cache_dir=cache, flip=True)
    np.testing.assert_array_equal(dataset.images[:10], images)
    np.testing.assert_array_equal(dataset.labels[:10], labels)
    assert type(dataset.images) is np.ndarray and dataset.images.flags.writeable
    partial = load_dataset(archive, cache_dir=cache, max_images=4)
    np.testing.assert_array_equal(partial.images, images[:4])
    np.testing.assert_array_equal(partial.labels, labels[:4])

  # Rewriting the archive invalidates the entry and replaces it.
  new_images = _random_images(seed=9)
  _write_zip(archive, new_images, None)
  stat = archive.stat()
  os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  dataset = load_dataset(archive, cache_dir=cache)
  np.testing.assert_array_equal(dataset.images, new_images)
  assert dataset.labels is None
  assert len(list((cache / "decoded").iterdir())) == 2

  # A damaged entry is ignored and rewritten.
  images_entry = next((cache / "decoded").glob("*.images.npy"))
  images_entry.write_bytes(b"garbage")
  np.testing.assert_array_equal(load_dataset(archive, cache_dir=cache).images, new_images)
  assert np.load(images_entry).shape == new_images.shape


def test_small_archives_are_not_cached(tmp_path):
  archive = _write_zip(tmp_path / "small.zip", _random_images(), _labels())
  load_dataset(archive, cache_dir=tmp_path / "cache")
  assert not (tmp_path / "cache" / "decoded").exists()


# --------------------------------------------------------------------------------------------------
# The real CIFAR-10 training set.


@pytest.mark.skipif(not SHARED_CIFAR_ZIP.is_file(), reason=f"{SHARED_CIFAR_ZIP} is absent")
def test_real_cifar10_zip(tmp_path):
  dataset = load_dataset(str(SHARED_CIFAR_ZIP), max_images=500, cache_dir=tmp_path)
  assert dataset.images.shape == (500, 32, 32, 3) and dataset.images.dtype == np.uint8
  assert dataset.labels.shape == (500,) and dataset.labels.dtype == np.int64
  assert dataset.labels.min() >= 0 and dataset.labels.max() <= 9
  assert len(np.unique(dataset.labels)) >= 8
  assert 80 < dataset.images.mean() < 160
  assert 40 < dataset.images.std() < 90
  assert dataset.name == "cifar10-train-32x32-jpeg"
