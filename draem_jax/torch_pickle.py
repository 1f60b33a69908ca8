"""Reads PyTorch checkpoint files (``torch.save``, zip format) into NumPy arrays, without torch.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive::

  <prefix>/data.pkl        pickle (protocol 2) of the saved object; tensors appear as calls of
                           torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
  <prefix>/data/<key>      raw bytes of each storage, referenced from the pickle by persistent ids
                           ("storage", <torch.XStorage class>, key, location, numel)
  <prefix>/byteorder       "little" or "big" (absent in older files: little)
  <prefix>/version, ...    bookkeeping

Unpickling executes whatever callables the pickle names, so a checkpoint from the internet is a program.
``load`` therefore never imports anything the pickle asks for: ``find_class`` answers only an explicit
allow-list (``collections.OrderedDict``, the tensor/parameter rebuild functions, storage and dtype markers,
``torch.Size``, ``set``) with functions of this module that build NumPy arrays, and refuses every other
global with ``UnsafeCheckpointError``. With ``allow_unknown_objects=True`` (for Lightning checkpoints, whose
hyper-parameters and callback states hold arbitrary Python objects), refused globals become inert
``OpaqueObject`` placeholders instead: their modules are still never imported and nothing of theirs runs.

The legacy non-zip format (torch < 1.6) is refused with a message saying how to re-save.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "CheckpointFormatError", "OpaqueObject", "load", "load_state_dict"]


class CheckpointFormatError(ValueError):
  """The file is not a readable PyTorch zip checkpoint (truncated, legacy format, not a checkpoint...)."""


class UnsafeCheckpointError(CheckpointFormatError):
  """The pickle names a global outside the allow-list (it could run arbitrary code)."""


# ----------------------------------------------------------------------------------------------------
# Markers the allow-list maps torch globals to (nothing here comes from torch).
# ----------------------------------------------------------------------------------------------------

class _StorageType:
  """Stands for a ``torch.XStorage`` class in a persistent id: only its element dtype matters."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class _Marker:
  """Stands for a torch class passed as data (``torch.Tensor`` in ``_rebuild_from_type_v2``)."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return self.name


class _Storage:
  """The bytes of one storage (uint8 view of the zip entry), its saved dtype and byte order."""

  def __init__(self, data: np.ndarray, dtype: np.dtype, key: str, byteorder: str):
    self.data, self.dtype, self.key, self.byteorder = data, dtype, key, byteorder


# Legacy typed storage classes torch still writes for the classic dtypes (torch/storage.py
# _dtype_to_storage_type_map); quantized storages are deliberately absent (refused).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128,
    "ComplexFloatStorage": np.complex64,
    # torch >= 2 writes dtypes without a legacy class as UntypedStorage (bytes) + a torch.dtype
    # (_rebuild_tensor_v3).
    "UntypedStorage": np.uint8,
}

# torch.<dtype> globals (a pickled torch.dtype is the global of that name), as NumPy dtypes.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


class OpaqueObject:
  """Inert stand-in for an object whose class is not on the allow-list (``allow_unknown_objects=True``).

  The pickle's constructor arguments, state and items are recorded as plain data; the named class is
  never imported and no code of it runs.
  """
  global_name = "?"

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

  def __setstate__(self, state):  # BUILD
    self.state = state

  def __setitem__(self, key, value):  # SETITEM(S) on a dict subclass
    self.items.append((key, value))

  def append(self, value):  # APPEND(S) on a list subclass
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f"<opaque {self.global_name}>"


def _opaque_class(module: str, name: str) -> type:
  # One throw-away subclass per refused global, so that NEWOBJ (cls.__new__(cls)) works too.
  return type("OpaqueObject", (OpaqueObject,), {"global_name": f"{module}.{name}"})


# ----------------------------------------------------------------------------------------------------
# Tensor rebuilding.
# ----------------------------------------------------------------------------------------------------

def _view(storage: _Storage, offset: int, size, stride, dtype: np.dtype) -> np.ndarray:
  """Copies the strided view (size, stride, offset in elements) of a storage out as a NumPy array."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
  dtype = np.dtype(dtype)
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or int(offset) < 0:
    raise CheckpointFormatError(
        f"storage {storage.key}: invalid tensor geometry size={size} stride={stride} offset={offset}")
  nbytes = storage.data.size
  if nbytes % dtype.itemsize:
    raise CheckpointFormatError(f"storage {storage.key}: {nbytes} bytes is not a whole number of "
                                f"{dtype} elements")
  flat = storage.data.view(dtype)
  if 0 in size:
    return np.zeros(size, dtype)
  # as_strided does no bounds check: a crafted file must not make it read past the storage.
  last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointFormatError(
        f"storage {storage.key}: tensor (size={size}, stride={stride}, offset={offset}) reaches element "
        f"{last} of a storage of {flat.size} (truncated or corrupt checkpoint)")
  view = np.lib.stride_tricks.as_strided(flat[int(offset):], shape=size,
                                         strides=tuple(s * dtype.itemsize for s in stride),
                                         writeable=False)
  out = np.array(view, order="C", copy=True)
  # Untyped storages (v3) learn their element size only here, so the byte order is fixed here too.
  return out.byteswap() if storage.byteorder != sys.byteorder and dtype.itemsize > 1 else out


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _view(storage, storage_offset, size, stride, storage.dtype if isinstance(storage, _Storage)
               else np.uint8)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, np.dtype):
    raise CheckpointFormatError(f"_rebuild_tensor_v3: expected a torch dtype, got {dtype!r}")
  return _view(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


_TENSOR_BUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                    _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
  # Tensors carrying Python attributes (or subclasses) are pickled as (func, type, args, state).
  del state
  if func not in _TENSOR_BUILDERS or not isinstance(new_type, _Marker):
    raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with {func!r} / {new_type!r} is not supported")
  return func(*args)


def _torch_size(dims=()):
  return tuple(int(d) for d in dims)


def _torch_device(*args):
  return ":".join(str(a) for a in args)


def _codecs_encode(text, encoding="latin1"):
  # Protocol-2 pickles spell ``bytes`` as _codecs.encode(str, "latin1"); nothing else is accepted.
  if not isinstance(text, str) or encoding != "latin1":
    raise UnsafeCheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes "
                                "literal")
  return text.encode("latin1")


def _allow_list() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      # Protocol-2 pickles written by Python 3 spell builtins the Python 2 way (fix_imports).
      ("builtins", "set"): set, ("__builtin__", "set"): set,
      ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
      ("_codecs", "encode"): _codecs_encode,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch", "Tensor"): _Marker("torch.Tensor"),
      ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
      ("torch", "Size"): _torch_size,
      ("torch", "device"): _torch_device,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  allowed[("torch.storage", "UntypedStorage")] = allowed[("torch", "UntypedStorage")]
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = np.dtype(dtype)
  return allowed


_ALLOWED = _allow_list()


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` with the allow-list above; storages come from the open zip."""

  def __init__(self, file, *, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str,
               allow_unknown_objects: bool):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._path, self._allow_unknown = path, allow_unknown_objects
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    found = _ALLOWED.get((module, name))
    if found is not None:
      return found
    if self._allow_unknown:
      return _opaque_class(module, name)
    raise UnsafeCheckpointError(
        f"{self._path}: refused to load the global '{module}.{name}' named by the checkpoint's pickle "
        "(only tensors, state dicts and plain containers are read; anything else could run code). If "
        "this is a Lightning/anomalib checkpoint whose extra entries hold Python objects, pass "
        "allow_unknown_objects=True (--allow_unknown_objects): such objects then become inert "
        "placeholders that are never imported. Otherwise re-save only the weights: "
        "torch.save(model.state_dict(), FILE).")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"{self._path}: unknown persistent id {pid!r} in data.pkl")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"{self._path}: storage {key!r} has unsupported type {storage_type!r} "
                                  "(quantized or unknown dtype)")
    key = str(key)
    cached = self._storages.get(key)
    if cached is None:
      entry = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(entry)
      except KeyError as e:
        raise CheckpointFormatError(f"{self._path}: storage entry {entry!r} is missing from the zip "
                                    "(truncated or corrupt checkpoint)") from e
      cached = _Storage(np.frombuffer(raw, np.uint8), storage_type.dtype, key, self._byteorder)
      self._storages[key] = cached
    elif cached.dtype != storage_type.dtype and storage_type.dtype != np.uint8:
      raise CheckpointFormatError(f"{self._path}: storage {key!r} is used with two dtypes")
    return cached


# ----------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------

def _open_zip(path: str) -> zipfile.ZipFile:
  with open(path, "rb") as f:
    head = f.read(8)
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    if head.startswith(b"PK"):
      raise CheckpointFormatError(f"{path}: the zip archive is truncated or corrupt ({e}); download or "
                                  "copy the checkpoint again.") from e
    if head[:1] == b"\x80":
      raise CheckpointFormatError(
          f"{path}: legacy PyTorch format (torch < 1.6, not a zip archive), which this reader does not "
          "parse; re-save it with torch>=1.6: torch.save(torch.load(OLD, weights_only=True), NEW).") from e
    raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (expected a zip archive written by "
                                "torch.save, got something else).") from e


def load(path: str | os.PathLike, *, allow_unknown_objects: bool = False) -> Any:
  """Loads the object saved by ``torch.save`` with every tensor as a NumPy array.

  Args:
    path: a ``.pt``/``.pth``/``.pckl``/``.ckpt`` file in PyTorch's zip format.
    allow_unknown_objects: replace globals outside the allow-list by inert ``OpaqueObject`` placeholders
      instead of raising (they are never imported or run); for Lightning checkpoints.

  Returns:
    The saved object: dicts / OrderedDicts / lists / tuples / scalars, tensors as NumPy arrays of the saved
    dtype (bfloat16 and float8 as ``ml_dtypes`` types) and shape, in C order.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle names a global outside the allow-list.
    CheckpointFormatError: truncated/corrupt/legacy/non-PyTorch file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  with _open_zip(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
      hint = (" It looks like an archive of checkpoints (e.g. DRAEM_checkpoints.zip): unzip it and pass "
              "the .pckl files." if any(n.endswith((".pckl", ".pt", ".pth", ".ckpt")) for n in names)
              else "")
      raise CheckpointFormatError(f"{path}: a zip archive but not a torch.save checkpoint (found "
                                  f"{len(pickles)} data.pkl entries, expected 1).{hint}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byteorder record {byteorder!r}")
    try:
      with archive.open(pickles[0]) as f:
        unpickler = _RestrictedUnpickler(f, archive=archive, prefix=prefix, byteorder=byteorder, path=path,
                                         allow_unknown_objects=allow_unknown_objects)
        return unpickler.load()
    except CheckpointFormatError:
      raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
      raise CheckpointFormatError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from e


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)


def load_state_dict(path: str | os.PathLike, *, allow_unknown_objects: bool = False
                    ) -> dict[str, np.ndarray]:
  """Loads a state dict: ``{name: array}``, from a plain state dict or a checkpoint wrapping one.

  Accepts ``torch.save(model.state_dict())`` files, ``{"state_dict": sd, ...}`` dicts and Lightning
  checkpoints (whose ``state_dict`` entry is used; with ``allow_unknown_objects`` their other entries may
  hold objects that become inert placeholders and are discarded).

  Args:
    path: checkpoint file (zip format).
    allow_unknown_objects: see ``load``.

  Returns:
    Ordered ``{key: np.ndarray}``.

  Raises:
    CheckpointFormatError: the file holds no state dict, or an entry of it is not a tensor.
    UnsafeCheckpointError: see ``load``.
  """
  obj = load(path, allow_unknown_objects=allow_unknown_objects)
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not _is_state_dict(obj):
    raise CheckpointFormatError(
        f"{path}: expected a state dict ({{name: tensor}}) or a checkpoint with a 'state_dict' entry, got "
        f"{type(obj).__name__}" + (f" with keys {list(obj)[:8]}" if isinstance(obj, dict) else ""))
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointFormatError(f"{path}: state dict entries that are not tensors: "
                                f"{', '.join(f'{k!r} ({type(obj[k]).__name__})' for k in bad[:5])}")
  return dict(obj)
