"""Dataset loading: every supported source becomes a uint8 NHWC array (pure I/O, no JAX).

Sources accepted by :func:`load_dataset`:

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, works offline).
* ``"cifar10"``: the CIFAR-10 training set, read from ``cifar-10-python.tar.gz`` (or an extracted
  ``cifar-10-batches-py`` folder) in the cache directory, downloaded there if absent.
* a path to

  - an EDM-style dataset ``.zip`` (PNG/JPEG images anywhere in the zip, ordered by name, optional
    ``dataset.json`` with class labels at the root of the zip);
  - a directory: an extracted ``cifar-10-batches-py`` folder if it holds ``data_batch_1``, else an
    image folder (searched recursively, ordered by relative path, optional ``dataset.json``);
  - ``cifar-10-python.tar.gz`` (``.tar.gz``/``.tgz``/``.tar``; read without extracting);
  - a ``.npz`` or ``.npy`` array file.

Images are returned as uint8 (N, H, W, C) with C = 1 (grayscale) or 3 (RGB); convert to model space
chunk by chunk with :func:`pspc_jax.conventions.to_model_range`. Every bad input raises
:class:`DatasetError` with a one-line, human-readable message naming the offending file.

The cache directory is ``cache_dir`` if given, else ``$PSPC_JAX_CACHE``, else ``~/.cache/pspc_jax``.
Besides the CIFAR-10 archive it holds ``decoded/``: full decodes of large archives (``.zip`` and
``.tar.gz`` sources with at least 1,000 images) saved as ``.npy`` keyed by a SHA-256 of the archive's
bytes, so repeated loads skip decoding and a changed archive is decoded again. Deleting it is always
safe.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.client
import importlib
import io
import json
import logging
import os
import pathlib
import pickle
import posixpath
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image

from pspc_jax.files import atomic_write

__all__ = [
  "CIFAR10_FILENAME",
  "CIFAR10_MD5",
  "CIFAR10_URL",
  "Dataset",
  "DatasetError",
  "add_flips",
  "default_cache_dir",
  "download_cifar10",
  "load_dataset",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILENAME = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
NAMED_DATASETS = ("digits", "cifar10")

_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_SIDE = 32
_DOWNLOAD_TIMEOUT_S = 30.0
_DOWNLOAD_CHUNK_BYTES = 1 << 20
_IMAGE_EXTENSIONS = frozenset(
  {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_LABELS_FILENAME = "dataset.json"
_FLOAT_TOLERANCE = 1e-3  # Float arrays may exceed [-1, 1] by this much (rounding in saved files).
# Decoding small images is dominated by PIL's Python-side header parsing, which holds the GIL, so
# threads only pay off for larger images (measured: slower at 32x32, break-even near 64x64).
_PARALLEL_MIN_PIXELS = 96 * 96
_DECODE_CHUNK = 256  # Images per thread-pool task.
_CACHE_VERSION = 2
_CACHE_MIN_IMAGES = 1000  # Smaller archives decode faster than the cache is worth.
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

_log = logging.getLogger(__name__)


class DatasetError(ValueError):
  """A dataset source is missing, unreadable or malformed; ``str(err)`` explains it in one line."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory image dataset.

  Attributes:
    images: uint8 (N, H, W, C), C-contiguous, C = 1 (grayscale) or 3 (RGB).
    labels: int64 (N,) class labels, or None when the source has none.
    name: short human-readable name, e.g. ``"cifar10"`` or ``"digits+flip"``.
  """

  images: np.ndarray
  labels: np.ndarray | None
  name: str

  def __post_init__(self):
    images = self.images
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
      raise DatasetError(
        f"Dataset.images must be a uint8 array of shape (N, H, W, C), got "
        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    object.__setattr__(self, "images", np.ascontiguousarray(images))
    if self.labels is not None:
      labels = np.asarray(self.labels)
      if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
          f"Dataset.labels must be integers of shape ({images.shape[0]},), got {labels.dtype} "
          f"{labels.shape}")
      object.__setattr__(self, "labels", np.ascontiguousarray(labels, dtype=np.int64))

  @property
  def num_images(self) -> int:
    """N, the number of images."""
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(int(d) for d in self.images.shape[1:])


def default_cache_dir() -> pathlib.Path:
  """Returns ``$PSPC_JAX_CACHE`` if set, else ``~/.cache/pspc_jax`` (not created)."""
  env = os.environ.get("PSPC_JAX_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "pspc_jax"


def add_flips(images: np.ndarray) -> np.ndarray:
  """Appends horizontal mirror images.

  Args:
    images: (N, H, W, C) array of any dtype.

  Returns:
    C-contiguous (2N, H, W, C) array, same dtype: ``images`` followed by ``images[:, :, ::-1]``.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise DatasetError(f"add_flips expects images of shape (N, H, W, C), got {images.shape}")
  return np.concatenate([images, images[:, :, ::-1]], axis=0)


def load_dataset(source: str | os.PathLike, *, flip: bool = False, max_images: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads a dataset as uint8 NHWC images (see the module docstring for the accepted sources).

  Args:
    source: ``"digits"``, ``"cifar10"``, or a path to a ``.zip``, ``.tar.gz``/``.tgz``/``.tar``,
      ``.npz`` or ``.npy`` file or to a directory. The names take precedence over same-named
      relative paths (write ``./digits`` for a folder called digits).
    flip: append horizontal mirror images (labels duplicated, ``+flip`` added to the name).
    max_images: keep only the first ``max_images`` images (>= 1), in source order. Applied before
      flipping, so ``flip=True`` returns ``2 * max_images`` images. Archives are only decoded as far
      as needed.
    cache_dir: where the CIFAR-10 archive and decoded-archive caches live; defaults to
      :func:`default_cache_dir`.

  Returns:
    A :class:`Dataset` with images uint8 (N, H, W, C), C in {1, 3}, and int64 labels or None.

  Raises:
    DatasetError: the source is unknown, missing, unreadable, malformed, inconsistent or empty, or
      CIFAR-10 has to be downloaded and cannot be.
  """
  if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                 or max_images < 1):
    raise DatasetError(f"max_images must be a positive integer or None, got {max_images!r}")
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  source_str = os.fspath(source)
  if source_str == "digits":
    images, labels = _load_digits(max_images)
    name = "digits"
  elif source_str == "cifar10":
    images, labels = _load_cifar10_from_cache(cache, max_images)
    name = "cifar10"
  else:
    path = _existing_path(source_str)
    images, labels = _load_path(path, max_images, cache)
    name = _dataset_name(path)
  if images.shape[0] == 0:
    raise DatasetError(f"{source_str} contains no images")
  if flip:
    images = add_flips(images)
    labels = None if labels is None else np.concatenate([labels, labels])
    name += "+flip"
  return Dataset(images=images, labels=labels, name=name)


def download_cifar10(cache_dir: str | os.PathLike | None = None, *,
                     url: str = CIFAR10_URL) -> pathlib.Path:
  """Makes sure ``cifar-10-python.tar.gz`` is in the cache directory, downloading it if needed.

  An existing file whose MD5 matches :data:`CIFAR10_MD5` is returned without touching the network.
  Otherwise the archive is streamed to a temporary file in the cache directory, verified, and
  renamed into place (so an interrupted download never leaves a partial archive behind).

  Args:
    cache_dir: target directory (created if needed); defaults to :func:`default_cache_dir`.
    url: where to download from.

  Returns:
    Path of the verified archive.

  Raises:
    DatasetError: the download failed (e.g. the machine is offline) or the checksum is wrong.
  """
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  target = cache / CIFAR10_FILENAME
  expected = CIFAR10_MD5
  if target.is_file():
    if _md5_of_file(target) == expected:
      return target
    _log.warning("%s fails its MD5 check; downloading it again", target)
  try:
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{CIFAR10_FILENAME}.", suffix=".part")
  except OSError as err:
    raise DatasetError(
      f"cannot create a file in the cache directory {cache}: {_os_reason(err)}") from err
  tmp = pathlib.Path(tmp_name)
  try:
    _log.info("downloading %s to %s", url, target)
    with os.fdopen(fd, "wb") as out:
      digest = _download_to(url, out, target)
    actual = digest.hexdigest()
    if actual != expected:
      raise DatasetError(
        f"the file downloaded from {url} has MD5 {actual}, expected {expected}; it is corrupt or "
        f"not the CIFAR-10 archive, and was deleted (nothing was saved to {target})")
    os.replace(tmp, target)
  except OSError as err:
    raise DatasetError(f"cannot save {target}: {_os_reason(err)}") from err
  finally:
    with contextlib.suppress(OSError):
      tmp.unlink()
  return target


# --------------------------------------------------------------------------------------------------
# Sources.


def _load_digits(max_images: int | None) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: values 0..16 mapped to uint8 by round(v * 255 / 16); (N, 8, 8, 1)."""
  from sklearn.datasets import load_digits  # Deferred: importing scikit-learn takes ~1 s.

  digits = load_digits()
  values = digits.images[:max_images]
  images = np.rint(values * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = np.asarray(digits.target[:max_images], dtype=np.int64)
  return np.ascontiguousarray(images), labels


def _load_cifar10_from_cache(cache: pathlib.Path, max_images: int | None):
  """CIFAR-10 from the cache directory (archive, else extracted folder), downloading if absent."""
  archive = cache / CIFAR10_FILENAME
  extracted = cache / CIFAR10_DIRNAME
  if archive.is_file():
    return _load_cached(archive, cache, max_images, _load_cifar_archive)
  if (extracted / _CIFAR10_BATCHES[0]).is_file():
    return _load_cifar_folder(extracted, max_images)
  archive = download_cifar10(cache)
  return _load_cached(archive, cache, max_images, _load_cifar_archive)


def _existing_path(source: str) -> pathlib.Path:
  """The path named by source, or DatasetError (listing the valid names for non-path strings)."""
  path = pathlib.Path(source).expanduser()
  if path.exists():
    return path
  looks_like_path = (os.sep in source or "/" in source or source.startswith((".", "~"))
                     or path.suffix.lower() in {".zip", ".gz", ".tgz", ".tar", ".npz", ".npy"})
  if looks_like_path:
    raise DatasetError(f"dataset not found: {path} does not exist")
  names = ", ".join(repr(n) for n in NAMED_DATASETS)
  raise DatasetError(
    f"unknown dataset {source!r}: expected one of {names}, or a path to a .zip, .tar.gz, .npz or "
    f".npy file or an image directory")


def _dataset_name(path: pathlib.Path) -> str:
  """A short name for a path source: the file name without its dataset extension."""
  name = path.resolve().name
  for suffix in (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".npy"):
    if name.lower().endswith(suffix) and len(name) > len(suffix):
      return name[:-len(suffix)]
  return name


def _load_path(path: pathlib.Path, max_images: int | None, cache: pathlib.Path):
  """Dispatches on the kind of path; returns (uint8 NHWC images, int64 labels or None)."""
  if path.is_dir():
    if (path / _CIFAR10_BATCHES[0]).is_file():
      return _load_cifar_folder(path, max_images)
    return _load_image_folder(path, max_images)
  name = path.name.lower()
  if name.endswith(".zip"):
    return _load_cached(path, cache, max_images, _load_zip)
  if name.endswith((".tar.gz", ".tgz", ".tar")):
    return _load_cached(path, cache, max_images, _load_cifar_archive)
  if name.endswith(".npz"):
    return _load_npz(path, max_images)
  if name.endswith(".npy"):
    return _load_npy(path, max_images)
  raise DatasetError(
    f"{path}: unknown dataset format {path.suffix or '(no extension)'!r}; expected a .zip, "
    f".tar.gz, .tgz, .npz or .npy file or a directory")


# --------------------------------------------------------------------------------------------------
# Encoded images (zip archives and folders).


def _is_image_name(relative: str) -> bool:
  """True for image files, skipping hidden files/folders and macOS resource forks."""
  parts = relative.split("/")
  if any(p.startswith(".") or p == "__MACOSX" for p in parts):
    return False
  return posixpath.splitext(relative)[1].lower() in _IMAGE_EXTENSIONS


def _load_zip(path: pathlib.Path, max_images: int | None):
  """EDM dataset zip: images sorted by member name; labels from a root dataset.json."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as err:
    raise DatasetError(f"{path}: not a readable zip file ({_os_reason(err)})") from err
  with archive:
    names = sorted(n for n in archive.namelist() if not n.endswith("/") and _is_image_name(n))
    if not names:
      raise DatasetError(f"{path} contains no images (looked for PNG/JPEG files)")
    names = names[:max_images]
    labels_json = None
    if _LABELS_FILENAME in set(archive.namelist()):
      labels_json = _read_member(archive, _LABELS_FILENAME, path)
    images = _decode_all(names, lambda name: _read_member(archive, name, path),
                         lambda name: f"{path}:{name}")
  labels = _parse_labels(labels_json, names, f"{path}:{_LABELS_FILENAME}")
  return images, labels


def _read_member(archive: zipfile.ZipFile, name: str, path: pathlib.Path) -> bytes:
  try:
    return archive.read(name)
  except Exception as err:  # BadZipFile, OSError, EOFError, zlib.error...
    raise DatasetError(f"{path}:{name}: cannot read from the zip ({_os_reason(err)})") from err


def _load_image_folder(path: pathlib.Path, max_images: int | None):
  """Image folder: images found recursively, sorted by relative path; optional root dataset.json."""
  relatives = []
  for root, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    rel_root = pathlib.Path(root).relative_to(path).as_posix()
    for file in files:
      relative = file if rel_root == "." else f"{rel_root}/{file}"
      if _is_image_name(relative):
        relatives.append(relative)
  relatives.sort()
  if not relatives:
    raise DatasetError(f"{path} contains no images (looked for PNG/JPEG files, recursively)")
  relatives = relatives[:max_images]
  labels_json = None
  labels_path = path / _LABELS_FILENAME
  if labels_path.is_file():
    labels_json = _read_file(labels_path)
  images = _decode_all(relatives, lambda rel: _read_file(path / rel), lambda rel: str(path / rel))
  return images, _parse_labels(labels_json, relatives, str(labels_path))


def _read_file(path: pathlib.Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as err:
    raise DatasetError(f"{path}: cannot read file ({_os_reason(err)})") from err


def _parse_labels(raw: bytes | None, names: Sequence[str], where: str) -> np.ndarray | None:
  """Labels for names from EDM's dataset.json ``{"labels": [[name, int], ...] or null}``.

  An image listed twice with the same label is accepted (the repeat says nothing new); listed twice
  with different labels, it is refused (DatasetError naming the image).
  """
  if raw is None:
    return None
  try:
    meta = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as err:
    raise DatasetError(f"{where}: not valid JSON ({_os_reason(err)})") from err
  entries = meta.get("labels") if isinstance(meta, dict) else None
  if entries is None:
    return None
  table = {}
  try:
    pairs = [(str(name).replace("\\", "/"), label) for name, label in entries]
  except (TypeError, ValueError) as err:
    raise DatasetError(f"{where}: 'labels' must be a list of [file name, label] pairs") from err
  for name, label in pairs:
    if table.setdefault(name, label) != label:
      raise DatasetError(f"{where}: {name} is listed twice, with labels {table[name]!r} and "
                         f"{label!r}; give each image one label")
  labels = np.empty(len(names), dtype=np.int64)
  for i, name in enumerate(names):
    if name not in table:
      raise DatasetError(f"{where}: no label for {name}")
    label = table[name]
    if isinstance(label, bool) or not isinstance(label, int):
      raise DatasetError(f"{where}: label of {name} is {label!r}; only integer class labels are "
                         f"supported")
    labels[i] = label
  return labels


def _decode_all(keys: Sequence[str], read: Callable[[str], bytes],
                display: Callable[[str], str]) -> np.ndarray:
  """Decodes images in order into one uint8 (N, H, W, C) array.

  The first image fixes H and W. The set is grayscale (C = 1) when every image is; otherwise
  grayscale images are promoted to RGB.

  Args:
    keys: image identifiers, in output order.
    read: returns the encoded bytes of a key (called from this thread only).
    display: names a key in error messages.
  """
  stack = _ImageStack(len(keys), display)
  first = _decode_image(read(keys[0]), display(keys[0]))
  stack.add(0, first, keys[0])
  rest = range(1, len(keys))
  workers = min(8, os.cpu_count() or 1)
  parallel = (workers > 1 and first.shape[0] * first.shape[1] >= _PARALLEL_MIN_PIXELS
              and len(keys) > 2 * _DECODE_CHUNK)
  if not parallel:
    for i in rest:
      stack.add(i, _decode_image(read(keys[i]), display(keys[i])), keys[i])
    return stack.result()
  chunks = [rest[s:s + _DECODE_CHUNK] for s in range(0, len(rest), _DECODE_CHUNK)]

  def decode_chunk(blobs, indices):
    return [_decode_image(blob, display(keys[i])) for blob, i in zip(blobs, indices)]

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = []  # (indices, future), in order; bounded so encoded bytes don't pile up.
    for chunk in chunks:
      blobs = [read(keys[i]) for i in chunk]  # Reading stays on this thread (zip handles).
      pending.append((chunk, pool.submit(decode_chunk, blobs, chunk)))
      while len(pending) > 2 * workers:
        _drain(pending.pop(0), stack, keys, pool)
    while pending:
      _drain(pending.pop(0), stack, keys, pool)
  return stack.result()


def _drain(item, stack, keys, pool) -> None:
  indices, future = item
  try:
    arrays = future.result()
  except BaseException:
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  for i, array in zip(indices, arrays):
    stack.add(i, array, keys[i])


class _ImageStack:
  """Fills a preallocated uint8 (N, H, W, C) array, checking sizes and reconciling channels."""

  def __init__(self, count: int, display: Callable[[str], str]):
    self._count = count
    self._display = display
    self._out = None
    self._first = None

  def add(self, index: int, image: np.ndarray, key: str) -> None:
    if self._out is None:
      self._out = np.empty((self._count, *image.shape), dtype=np.uint8)
      self._first = key
    height, width, channels = self._out.shape[1:]
    if image.shape[:2] != (height, width):
      raise DatasetError(
        f"{self._display(key)}: image is {image.shape[1]}x{image.shape[0]} (width x height) but "
        f"{self._display(self._first)} is {width}x{height}; all images must have the same size")
    if image.shape[2] != channels:
      if channels == 1:  # First RGB image after grayscale ones: promote what we have so far.
        self._out = np.repeat(self._out, 3, axis=3)
      else:
        image = np.repeat(image, 3, axis=2)
    self._out[index] = image

  def result(self) -> np.ndarray:
    return self._out


def _decode_image(data: bytes, name: str) -> np.ndarray:
  """Decodes one encoded image to uint8 (H, W, 1) for grayscale modes or (H, W, 3) otherwise.

  Alpha is dropped; palette images become grayscale if their pixels are all gray, else RGB; 16-bit
  grayscale is scaled to 8 bits (see _pil_to_array); other modes (CMYK, YCbCr, ...) are converted to RGB.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return _pil_to_array(image, name)
  except DatasetError:
    raise
  except Exception as err:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
    reason = "not a recognized image file" if isinstance(err, Image.UnidentifiedImageError) else (
      f"cannot decode image ({type(err).__name__}: {_os_reason(err)})")
    raise DatasetError(f"{name}: {reason}") from err


def _pil_to_array(image: Image.Image, name: str) -> np.ndarray:
  """A loaded PIL image as uint8 (H, W, 1) or (H, W, 3); see _decode_image."""
  mode = image.mode
  if mode == "RGB":
    return np.asarray(image)
  if mode == "L":
    return np.asarray(image)[..., None]
  if mode in _GRAYSCALE_MODES:
    return np.asarray(image.convert("L"))[..., None]
  if mode in _SIXTEEN_BIT_MODES:  # 32-bit "I" holding 0..255 is taken as 8-bit, else 16-bit.
    values = np.asarray(image).astype(np.float64)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
      raise DatasetError(f"{name}: integer image values outside [0, 65535] are not supported")
    if mode != "I" or values.max(initial=0) > 255:
      values = np.rint(values / 257.0)
    return values.astype(np.uint8)[..., None]
  if mode == "F":
    raise DatasetError(f"{name}: floating-point images (PIL mode F) are not supported")
  if mode in ("P", "PA"):
    rgb = np.asarray(image.convert("RGBA"))[..., :3]
    if (rgb[..., :1] == rgb).all():
      return np.ascontiguousarray(rgb[..., :1])
    return np.ascontiguousarray(rgb)
  if mode in ("RGBA", "RGBa", "RGBX"):
    return np.ascontiguousarray(np.asarray(image)[..., :3])
  return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------------
# CIFAR-10 pickles.


def _load_cifar_archive(path: pathlib.Path, max_images: int | None):
  """Training images of cifar-10-python.tar.gz, read from the tar without extracting."""
  batches = {}
  mode = "r:" if path.name.lower().endswith(".tar") else "r:gz"
  try:
    with tarfile.open(path, mode) as archive:
      for member in archive:
        base = posixpath.basename(member.name)
        if base in _CIFAR10_BATCHES and member.isfile() and base not in batches:
          with archive.extractfile(member) as fileobj:
            batches[base] = _read_cifar_batch(fileobj, f"{path}:{member.name}")
          if _have_enough(batches, max_images):
            break
  except DatasetError:
    raise
  except Exception as err:  # tarfile.TarError, OSError, EOFError, zlib.error.
    kind = "tar" if mode == "r:" else "tar.gz"
    raise DatasetError(
      f"{path}: not a readable CIFAR-10 {kind} archive ({_os_reason(err)})") from err
  return _join_cifar_batches(batches, max_images, path)


def _load_cifar_folder(path: pathlib.Path, max_images: int | None):
  """Training images of an extracted cifar-10-batches-py folder."""
  batches = {}
  for base in _CIFAR10_BATCHES:
    batch_path = path / base
    if not batch_path.is_file():
      break
    try:
      with open(batch_path, "rb") as fileobj:
        batches[base] = _read_cifar_batch(fileobj, str(batch_path))
    except OSError as err:
      raise DatasetError(f"{batch_path}: cannot read file ({_os_reason(err)})") from err
    if _have_enough(batches, max_images):
      break
  return _join_cifar_batches(batches, max_images, path)


def _have_enough(batches: dict, max_images: int | None) -> bool:
  """True once all five batches, or data_batch_1..k holding max_images images, are present."""
  if len(batches) == len(_CIFAR10_BATCHES):
    return True
  if max_images is None:
    return False
  total = 0
  for base in _CIFAR10_BATCHES:
    if base not in batches:
      return False
    total += len(batches[base][1])
    if total >= max_images:
      return True
  return False


def _join_cifar_batches(batches: dict, max_images: int | None, path: pathlib.Path):
  """Concatenates data_batch_1..5 in order (only as many as max_images needs)."""
  images, labels = [], []
  for base in _CIFAR10_BATCHES:
    if base not in batches:
      missing = ", ".join(b for b in _CIFAR10_BATCHES if b not in batches)
      raise DatasetError(
        f"{path}: missing CIFAR-10 training batches {missing} (expected {CIFAR10_FILENAME} or an "
        f"extracted {CIFAR10_DIRNAME} folder)")
    images.append(batches[base][0])
    labels.append(batches[base][1])
    if max_images is not None and sum(len(x) for x in labels) >= max_images:
      break
  return (np.ascontiguousarray(np.concatenate(images)[:max_images]),
          np.concatenate(labels)[:max_images])


def _read_cifar_batch(fileobj: BinaryIO, where: str) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 batch pickle -> uint8 (n, 32, 32, 3) images and int64 (n,) labels."""
  try:
    batch = _RestrictedUnpickler(fileobj, encoding="bytes").load()
  except DatasetError:
    raise
  except Exception as err:
    raise DatasetError(f"{where}: not a readable CIFAR-10 batch ({_os_reason(err)})") from err
  if not isinstance(batch, dict):
    raise DatasetError(f"{where}: not a CIFAR-10 batch (expected a pickled dict)")
  data = batch.get(b"data", batch.get("data"))
  labels = batch.get(b"labels", batch.get("labels"))
  if data is None or labels is None:
    raise DatasetError(f"{where}: not a CIFAR-10 batch (no 'data' and 'labels' entries)")
  data = np.asarray(data)
  pixels = 3 * _CIFAR10_SIDE * _CIFAR10_SIDE
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
    raise DatasetError(f"{where}: 'data' must be uint8 of shape (n, {pixels}), got {data.dtype} "
                       f"{data.shape}")
  labels = np.asarray(labels)
  if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise DatasetError(f"{where}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} "
                       f"{labels.shape}")
  images = data.reshape(-1, 3, _CIFAR10_SIDE, _CIFAR10_SIDE).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int64)


def _numpy_global(submodule: str, name: str):
  """numpy.{_core,core}.<submodule>.<name>, whichever this NumPy has, without deprecation noise."""
  for prefix in ("numpy._core", "numpy.core"):
    with contextlib.suppress(ImportError):
      module = importlib.import_module(f"{prefix}.{submodule}")
      if hasattr(module, name):
        return getattr(module, name)
  raise pickle.UnpicklingError(f"NumPy has no {submodule}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles only plain containers and NumPy arrays: no arbitrary code from untrusted pickles."""

  def find_class(self, module, name):
    if (module, name) == ("_codecs", "encode"):
      import codecs
      return codecs.encode
    if (module, name) == ("numpy", "ndarray"):
      return np.ndarray
    if (module, name) == ("numpy", "dtype"):
      return np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "_reconstruct", "scalar"):
      return _numpy_global("multiarray", name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
      return _numpy_global("numeric", name)
    raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")


# --------------------------------------------------------------------------------------------------
# Arrays.


def _load_npz(path: pathlib.Path, max_images: int | None):
  """Images under key images/x (or the only array); labels under labels/y."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      keys = list(archive.keys())
      image_key = next((k for k in ("images", "x") if k in keys), None)
      if image_key is None:
        if len(keys) != 1:
          raise DatasetError(
            f"{path}: cannot tell which array holds the images; name it 'images' (found keys "
            f"{', '.join(keys) or 'none'})")
        image_key = keys[0]
      images = archive[image_key]
      label_key = next((k for k in ("labels", "y") if k in keys), None)
      labels = archive[label_key] if label_key is not None else None
  except DatasetError:
    raise
  except Exception as err:  # OSError, ValueError, zipfile.BadZipFile, EOFError.
    raise DatasetError(f"{path}: not a readable .npz file ({_os_reason(err)})") from err
  images = _array_to_images(images, f"{path}[{image_key!r}]", max_images)
  if labels is not None:
    labels = _array_to_labels(labels, f"{path}[{label_key!r}]", max_images, images.shape[0])
  return images, labels


def _load_npy(path: pathlib.Path, max_images: int | None):
  """A single image array; memory-mapped so max_images avoids reading the whole file."""
  try:
    images = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as err:  # OSError, ValueError (pickled or malformed arrays).
    raise DatasetError(f"{path}: not a readable .npy file ({_os_reason(err)})") from err
  if not isinstance(images, np.ndarray):
    raise DatasetError(f"{path}: not a .npy array file")
  return _array_to_images(images, str(path), max_images), None


def _array_to_images(array: np.ndarray, where: str, max_images: int | None) -> np.ndarray:
  """Validates and converts an image array to uint8 (N, H, W, C), C in {1, 3} (alpha dropped).

  Accepts (N, H, W) or (N, H, W, C) with C in {1, 3, 4}; uint8, integers in [0, 255], or floats in
  [-1, 1] (mapped by rint((x + 1) * 127.5)). Floats in [0, 1] are indistinguishable from dark
  [-1, 1] images and are read as the latter.
  """
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4:
    raise DatasetError(f"{where}: expected images of shape (N, H, W, C) or (N, H, W), got "
                       f"{array.shape}")
  channels = array.shape[3]
  if channels not in (1, 3, 4):
    if array.shape[1] in (1, 3, 4):
      raise DatasetError(
        f"{where}: shape {array.shape} looks like NCHW (channels first); images must be NHWC "
        f"(channels last), e.g. x.transpose(0, 2, 3, 1)")
    raise DatasetError(f"{where}: images of shape {array.shape} have {channels} channels; expected "
                       f"(N, H, W, C) with C = 1, 3 or 4")
  array = array[:max_images, :, :, :3]
  if array.dtype == np.uint8:
    return np.array(array, order="C")  # A copy: never a view of a memory-mapped file.
  if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                     or np.issubdtype(array.dtype, np.floating)):
    raise DatasetError(f"{where}: unsupported image dtype {array.dtype}; expected uint8 or floats "
                       f"in [-1, 1]")
  if array.size == 0:
    return np.zeros(array.shape, dtype=np.uint8)
  low, high = array.min(), array.max()
  if np.issubdtype(array.dtype, np.integer):
    if low < 0 or high > 255:
      raise DatasetError(f"{where}: integer images range from {low} to {high}; expected [0, 255]")
    return np.ascontiguousarray(array, dtype=np.uint8)
  if not (np.isfinite(low) and np.isfinite(high)):
    raise DatasetError(f"{where}: float images contain NaN or infinity")
  if low < -1 - _FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
    raise DatasetError(
      f"{where}: float images range from {low:.4g} to {high:.4g}; float images must be in [-1, 1] "
      f"(store uint8 for [0, 255] images)")
  scaled = np.rint((np.asarray(array, dtype=np.float32) + 1.0) * 127.5)
  return np.clip(scaled, 0, 255).astype(np.uint8)


def _array_to_labels(labels: np.ndarray, where: str, max_images: int | None,
                     count: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  labels = labels[:max_images]
  if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
    raise DatasetError(f"{where}: labels must be {count} integers (one per image), got "
                       f"{labels.dtype} {labels.shape}")
  return labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Decoded-archive cache.


def _load_cached(path: pathlib.Path, cache: pathlib.Path, max_images: int | None,
                 load: Callable[[pathlib.Path, int | None], tuple]):
  """Runs load(path, max_images), reusing or writing a decoded copy in cache/decoded/.

  Entries are named by the archive's absolute path (so that a new version of the archive replaces the
  entry of the old one) and keyed by the SHA-256 of its bytes (so that a changed archive is never
  served stale images, whatever its size and modification time; hashing costs about 0.05 s for the
  53 MB CIFAR-10 zip), and written atomically (temp file + rename), labels before images, so a present
  images file means a complete entry. Partial loads (max_images) read a complete entry but never
  write one. Cache failures only warn.
  """
  path_key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
  folder = cache / "decoded"
  if max_images is not None and not any(folder.glob(f"{path_key}-*.images.npy")):
    return load(path, max_images)  # nothing to read, and a partial load writes nothing
  stem = f"{path_key}-v{_CACHE_VERSION}-{_digest_of_file(path, 'sha256')[:32]}"
  images_path = folder / f"{stem}.images.npy"
  labels_path = folder / f"{stem}.labels.npy"
  cached = _read_cache_entry(images_path, labels_path, max_images)
  if cached is not None:
    return cached
  images, labels = load(path, max_images)
  if max_images is None and images.shape[0] >= _CACHE_MIN_IMAGES:
    try:
      folder.mkdir(parents=True, exist_ok=True)
      for old in folder.glob(f"{path_key}-*"):  # Entries for older versions of this archive.
        if not old.name.startswith(stem):
          with contextlib.suppress(OSError):
            old.unlink()
      empty = np.zeros(0, dtype=np.int64)
      _save_atomic(labels_path, empty if labels is None else labels)
      _save_atomic(images_path, images)
    except OSError as err:
      warnings.warn(f"could not cache decoded images of {path} in {folder}: {_os_reason(err)}")
  return images, labels


def _read_cache_entry(images_path: pathlib.Path, labels_path: pathlib.Path,
                      max_images: int | None):
  """(images, labels) from a cache entry, or None if absent or unusable."""
  if not images_path.is_file():
    return None
  try:
    stored = np.load(images_path, mmap_mode="r", allow_pickle=False)
    labels = np.load(labels_path, allow_pickle=False)
  except (OSError, ValueError) as err:
    _log.warning("ignoring unreadable cache entry %s: %s", images_path, err)
    return None
  count = stored.shape[0] if stored.ndim else 0
  if (stored.dtype != np.uint8 or stored.ndim != 4 or labels.dtype != np.int64
      or labels.shape not in ((0,), (count,))):
    _log.warning("ignoring malformed cache entry %s", images_path)
    return None
  images = np.array(stored[:max_images])  # Copies into memory; drops the memory map.
  del stored
  return images, (labels[:max_images].copy() if labels.size else None)


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  """np.save to a temp file next to path, then rename over it."""
  with atomic_write(path) as out:
    np.save(out, array, allow_pickle=False)


# --------------------------------------------------------------------------------------------------
# Helpers.

_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


def _download_to(url: str, out: BinaryIO, target: pathlib.Path):
  """Streams url into out; returns the MD5 digest object. Network errors become DatasetError."""
  advice = (f"place {CIFAR10_FILENAME} (from {url}) at {target}, or pass a dataset path with "
            f"--dataset")
  digest = hashlib.md5()
  try:
    response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)
  except _NETWORK_ERRORS as err:
    raise DatasetError(f"cannot download CIFAR-10 from {url} ({_network_reason(err)}); this "
                       f"machine appears to be offline: {advice}") from err
  with response:
    while True:
      try:
        chunk = response.read(_DOWNLOAD_CHUNK_BYTES)
      except _NETWORK_ERRORS as err:
        raise DatasetError(f"the download of {url} was interrupted ({_network_reason(err)}); the "
                           f"machine may be offline: {advice}") from err
      if not chunk:
        return digest
      digest.update(chunk)
      out.write(chunk)


def _md5_of_file(path: pathlib.Path) -> str:
  return _digest_of_file(path, "md5")


def _digest_of_file(path: pathlib.Path, algorithm: str) -> str:
  """Hex digest of the file's bytes, read in 1 MiB blocks; DatasetError if it cannot be read."""
  digest = hashlib.new(algorithm)
  try:
    with open(path, "rb") as f:
      while chunk := f.read(_DOWNLOAD_CHUNK_BYTES):
        digest.update(chunk)
  except OSError as err:
    raise DatasetError(f"{path}: cannot read file ({_os_reason(err)})") from err
  return digest.hexdigest()


def _network_reason(err: BaseException) -> str:
  reason = getattr(err, "reason", None)
  return " ".join(str(reason if reason is not None else err).split()) or type(err).__name__


def _os_reason(err: BaseException) -> str:
  """A short one-line reason, without repeating the file name (OSError's str includes it)."""
  if isinstance(err, OSError) and err.strerror:
    return err.strerror
  return " ".join(str(err).split()) or type(err).__name__
