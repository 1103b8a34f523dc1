"""Read ``torch.save`` files into numpy without importing torch and without running their code.

A ``torch.save`` file (torch >= 1.6) is a zip archive: ``<prefix>/data.pkl`` is a pickle whose
tensors refer, through pickle's persistent ids, to raw storages in ``<prefix>/data/<key>``.
Unpickling is what makes such files dangerous: a pickle may name any importable callable and
call it. Here ``find_class`` answers from a fixed allow-list with inert stand-ins (tensor
rebuilders that only slice numpy arrays, dtype and storage markers, ``OrderedDict``, ``set``)
and refuses every other global with :class:`UnsafePickleError` before anything runs.

A whole pickled module (``torch.save(model)``) names its classes (``torch.nn.modules.conv.
Conv2d``, ``torchvision.models.resnet.ResNet``, ...). Those are replaced by empty stub classes
that only receive the pickled ``__dict__``; the parameters and buffers are then collected from
``_parameters``/``_buffers``/``_modules`` exactly as ``nn.Module.state_dict()`` would.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import pickle
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

__all__ = ["TorchFileError", "UnsafePickleError", "load_safetensors", "load_state_dict", "save_state_dict"]


class TorchFileError(ValueError):
    """The file is not a readable ``torch.save`` archive; the message names the file."""


class UnsafePickleError(TorchFileError):
    """The pickle names a global outside the allow-list; nothing from it was run."""


# Legacy storage classes (torch/storage.py ``_dtype_to_storage_type_map``) and the dtypes that
# newer files pair with ``torch.storage.UntypedStorage`` in ``_rebuild_tensor_v3``.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
# Module classes are never imported; any class from these packages becomes an inert stub.
_MODULE_PACKAGES = ("torch.nn.modules.", "torchvision.models.", "torchvision.ops.")
# Pickled by torch < 1.6 (not a zip): the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _Sealed:
    """Base of every object ``find_class`` hands to the pickle.

    Pickle's BUILD opcode may set attributes on any object it holds; slots without a
    ``__dict__`` and a refusing ``__setattr__`` keep a hostile file from altering these.
    """

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"the pickle tried to set {name!r} on {self!r}")


class _Marker(_Sealed):
    """Stands for a torch dtype or storage class; carries the numpy dtype."""

    __slots__ = ("torch_name", "dtype", "untyped")

    def __init__(self, torch_name: str, dtype: np.dtype, untyped: bool = False):
        object.__setattr__(self, "torch_name", torch_name)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "untyped", untyped)

    def __repr__(self) -> str:
        return self.torch_name


class _Function(_Sealed):
    """A callable stand-in for an allowed torch function or builtin."""

    __slots__ = ("torch_name", "fn")

    def __init__(self, torch_name: str, fn: Callable):
        object.__setattr__(self, "torch_name", torch_name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.torch_name


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """One storage of the archive as a flat numpy array of its element dtype."""

    data: np.ndarray
    key: str


class _StubMeta(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafePickleError(f"the pickle tried to set {name!r} on class {cls.__name__}")


class _ModuleStub(metaclass=_StubMeta):
    """Inert stand-in for a pickled ``nn.Module``: it only stores the pickled ``__dict__``."""

    torch_class = "torch.nn.Module"

    def __new__(cls, *args: Any) -> "_ModuleStub":
        if args:  # torch pickles modules with NEWOBJ and no arguments; anything else is odd
            raise UnsafePickleError(f"{cls.torch_class} constructed with arguments {args!r}")
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafePickleError(f"the pickle tried to call {self.torch_class}")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(f"unexpected pickled state for {self.torch_class}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<stub {self.torch_class}>"


def _naturals(xs: Any) -> bool:
    return isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)


def _rebuild_tensor(
    storage: _Storage, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> np.ndarray:
    """``torch._utils._rebuild_tensor``: a strided view of the storage, copied to own memory."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    data = storage.data
    if dtype is not None:  # v3: an untyped (byte) storage reinterpreted as ``dtype``
        if data.nbytes % dtype.itemsize:
            raise TorchFileError(f"storage {storage.key}: {data.nbytes} bytes is not a whole "
                                 f"number of {dtype} elements")
        data = data.view(dtype)
    if type(offset) is not int or offset < 0 or not _naturals(size) or not _naturals(stride) \
            or len(size) != len(stride):
        raise TorchFileError(f"storage {storage.key}: invalid tensor geometry "
                             f"offset={offset!r} size={size!r} stride={stride!r}")
    if 0 in size:
        return np.empty(size, data.dtype)
    # Bounds-check before as_strided: it would otherwise read whatever memory the file points at.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise TorchFileError(f"storage {storage.key}: tensor of size {size} stride {stride} "
                             f"offset {offset} reads element {last} of {data.size}")
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride),
        writeable=False,
    )
    return view.copy()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    _check_hooks(hooks)
    if metadata:  # e.g. conjugate/negative bits, which would change the values
        raise TorchFileError(f"tensor with metadata {metadata!r} is not supported")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    _check_hooks(hooks)
    if not isinstance(dtype, _Marker) or dtype.untyped:
        raise TorchFileError(f"tensor with dtype {dtype!r} is not supported")
    if metadata:
        raise TorchFileError(f"tensor with metadata {metadata!r} is not supported")
    if not isinstance(storage, _Storage) or storage.data.dtype != np.uint8:
        raise TorchFileError("_rebuild_tensor_v3 needs an untyped storage")
    return _rebuild_tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks):
    _check_hooks(hooks)
    return _check_array(data)


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
    # ``state`` holds Python attributes set on the Parameter; they carry no values we need.
    _check_hooks(hooks)
    return _check_array(data)


def _check_hooks(hooks: Any) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise TorchFileError("tensor carries backward hooks; torch never serialises those")


def _check_array(data: Any) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise TorchFileError(f"parameter built from {type(data).__name__}, not a tensor")
    return data


class _NumpyDtype:
    """An inert stand-in for ``numpy.dtype`` as pickle rebuilds one (``dtype('f8', False, True)``,
    then its state, whose second field is the byte order): numeric kinds only, never objects."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(name, str) or name[:1] not in "biufc?" or np.dtype(name).kind not in "biufc":
            raise UnsafePickleError(f"a pickled numpy dtype {name!r} that is not numeric")
        self.dtype, self.order = np.dtype(name), "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar(dtype, bytes)``: a numeric numpy scalar (a training loop's
    ``best_acc``), read from its bytes."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise UnsafePickleError("a pickled numpy scalar that is not a numeric value")
    return np.frombuffer(data, dtype.dtype.newbyteorder(dtype.order))[0]


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how pickle protocol 2 spells bytes (a numpy scalar's)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


_FUNCTIONS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # numpy scalars beside the weights (numpy 1 and 2 spell the module differently)
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _latin1_bytes,
    # pickle protocol 2 spells builtins as __builtin__; nn.Module keeps a set of buffer names
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
}


class _Record:
    """An inert stand-in for a plain object that training loops save beside the weights
    (``argparse.Namespace``, e.g. torchvision's reference scripts' ``args``): it receives the
    pickled ``__dict__`` and nothing else."""


class _Partial:
    """An inert stand-in for ``functools.partial`` as torchvision's modules keep one
    (ViT's ``norm_layer = partial(nn.LayerNorm, eps=1e-6)``): it receives the pickled function
    (a module stub class), arguments and state, and can never be called."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Unpickler(pickle.Unpickler):
    """The allow-list: every global a pickle names passes through ``find_class``."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, big_endian: bool):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._big_endian = big_endian
        self._storages: dict[str, _Storage] = {}
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if (module, name) in _FUNCTIONS:
            return _Function(full, _FUNCTIONS[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Marker(full, _STORAGE_DTYPES[name])
        if (module, name) in (("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")):
            return _Marker(full, np.dtype(np.uint8), untyped=True)
        if module == "torch" and name in _TORCH_DTYPES:
            return _Marker(full, _TORCH_DTYPES[name])
        if (module, name) == ("argparse", "Namespace"):
            return _Record
        if (module, name) == ("functools", "partial"):
            return _Partial
        if (module, name) == ("numpy", "dtype"):
            return _NumpyDtype
        if module.startswith(_MODULE_PACKAGES) and name.isidentifier() and name[:1].isupper():
            if full not in self._stubs:
                self._stubs[full] = _StubMeta(name, (_ModuleStub,), {"torch_class": full})
            return self._stubs[full]
        raise UnsafePickleError(
            f"{self._path}: refusing to load global '{full}': kdjax only rebuilds tensors and "
            "torch.nn/torchvision module trees and never runs code from a checkpoint. If you "
            "trust the file, re-save it with torch.save(model.state_dict(), path)."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self._path}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _Marker) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise TorchFileError(f"{self._path}: malformed storage reference {pid!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(self._read_storage(key, storage_type.dtype, numel), key)
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        record = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError:
            raise TorchFileError(f"{self._path}: storage record {record} is missing") from None
        nbytes = numel * dtype.itemsize
        if len(raw) < nbytes:
            raise TorchFileError(f"{self._path}: storage {record} holds {len(raw)} bytes, "
                                 f"{numel} x {dtype} needs {nbytes}")
        data = np.frombuffer(raw, dtype, count=numel)
        # Storages are written in the saving machine's byte order, recorded in ``byteorder``.
        return data.byteswap() if self._big_endian and dtype.itemsize > 1 else data


def _open_archive(path: pathlib.Path) -> tuple[zipfile.ZipFile, str]:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise TorchFileError(
                f"{path}: legacy (torch < 1.6) serialization format, which kdjax does not read. "
                "Re-save it with a current torch: torch.save(torch.load(path), new_path)."
            )
        raise TorchFileError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive)")
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        hint = " (a TorchScript archive from torch.jit.save?)" if any(
            n.endswith("/constants.pkl") for n in names) else ""
        archive.close()
        raise TorchFileError(f"{path}: zip archive without a single <name>/data.pkl record; "
                             f"not a torch.save file{hint}")
    return archive, pickles[0][: -len("data.pkl")]


def _load(path: pathlib.Path) -> Any:
    archive, prefix = _open_archive(path)
    with archive:
        try:
            order = archive.read(prefix + "byteorder").decode("ascii").strip()
        except KeyError:
            order = "little"  # files from torch < 1.10 have no byteorder record
        if order not in ("little", "big"):
            raise TorchFileError(f"{path}: unknown byteorder {order!r}")
        with archive.open(prefix + "data.pkl") as f:
            unpickler = _Unpickler(f, archive, prefix, str(path), big_endian=order == "big")
            try:
                return unpickler.load()
            except TorchFileError as err:
                if str(err).startswith(str(path)):
                    raise
                raise type(err)(f"{path}: {err}") from err  # name the file in every message
            except Exception as err:  # noqa: BLE001 - any failure of a hostile pickle is a bad file
                raise TorchFileError(f"{path}: cannot unpickle data.pkl ({err})") from err


def _module_state_dict(module: _ModuleStub, prefix: str, out: dict[str, np.ndarray]) -> None:
    """``nn.Module.state_dict``: own parameters, persistent buffers, then children in order."""
    state = module.__dict__
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for attr in ("_parameters", "_buffers"):
        for name, value in (state.get(attr) or {}).items():
            if value is None or (attr == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, np.ndarray):
                raise TorchFileError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _ModuleStub):
            raise TorchFileError(f"{prefix}{name} is a {type(child).__name__}, not a module")
        _module_state_dict(child, f"{prefix}{name}.", out)


# Where training loops keep the weights in the dicts they save: torchvision's reference scripts
# ("model"), Lightning and most loops ("state_dict"), others ("model_state_dict", "net", "module").
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _state_dict_of(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
    if isinstance(obj, _ModuleStub):
        state_dict: dict[str, np.ndarray] = {}
        _module_state_dict(obj, "", state_dict)
        return state_dict
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and (isinstance(obj[key], _ModuleStub) or _is_state_dict(obj[key])):
                return _state_dict_of(obj[key], path)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise TorchFileError(
            f"{path}: holds a dict ({keys}) that is neither a state_dict nor holds one under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}; save model.state_dict() or the model itself"
        )
    raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a module")


def _without_wrapper_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys without the ``module.`` that DataParallel / DistributedDataParallel put in front of
    every name (only when every key has it)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool),
}


def load_safetensors(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file (an 8-byte little-endian header length, a JSON
    header ``{name: {dtype, shape, data_offsets}}``, then the raw bytes); no code involved."""
    import json

    path = pathlib.Path(path)
    raw = path.read_bytes()
    if len(raw) < 8:
        raise TorchFileError(f"{path}: too short for a safetensors file")
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as err:
        raise TorchFileError(f"{path}: unreadable safetensors header ({err})") from None
    data = memoryview(raw)[8 + n:]
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        begin, end = entry.get("data_offsets", (0, -1))
        shape = tuple(entry.get("shape", ()))
        if dtype is None:
            raise TorchFileError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        if not 0 <= begin <= end <= len(data) or (end - begin) != dtype.itemsize * int(np.prod(shape)):
            raise TorchFileError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit "
                                 f"its shape {shape} x {dtype} or the file")
        out[name] = np.frombuffer(data[begin:end], dtype).reshape(shape).copy()
    return out


def load_state_dict(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """The ``{dotted_name: array}`` state_dict in a weights file, as users have them.

    A ``torch.save`` file may hold a state_dict (``torch.save(model.state_dict())``), a whole
    module (``torch.save(model)``; the result equals ``model.state_dict()``, with
    ``num_batches_tracked`` and in the same order) or a training loop's dict holding either under
    one of ``STATE_DICT_KEYS`` (its other entries, such as epoch, optimizer or args, are
    ignored). A ``.safetensors`` file is read directly. DataParallel's ``module.`` prefix is
    removed. Arrays keep their dtype.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _without_wrapper_prefix(load_safetensors(path))
    return _without_wrapper_prefix(_state_dict_of(_load(path), path))


# --------------------------------------------------------------------------- writing

_STORAGE_OF = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
               np.dtype(np.int64): "LongStorage"}


def _pickle_state_dict(state_dict: dict[str, np.ndarray]) -> tuple[bytes, list[bytes]]:
    """The ``data.pkl`` that ``torch.save(state_dict)`` writes (pickle protocol 2, written opcode
    by opcode: no torch to import) and the raw storages it refers to. Only globals that
    ``torch.load(..., weights_only=True)`` allows appear: ``collections.OrderedDict``,
    ``torch._utils._rebuild_tensor_v2`` and the typed storages."""
    import struct

    def text(value: str) -> bytes:
        raw = value.encode("utf-8")
        return b"X" + struct.pack("<I", len(raw)) + raw

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    def global_(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def int_tuple(values) -> bytes:
        return b"(" + b"".join(integer(int(v)) for v in values) + b"t"

    ordered_dict = global_("collections", "OrderedDict") + b")R"
    out = [b"\x80\x02", ordered_dict, b"("]
    storages: list[bytes] = []
    for key, array in state_dict.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _STORAGE_OF:
            raise TorchFileError(f"{key}: cannot write dtype {array.dtype} (float32, float64, int64)")
        strides = [s // array.itemsize for s in array.strides] if array.ndim else []
        storage_id = (b"(" + text("storage") + global_("torch", _STORAGE_OF[array.dtype])
                      + text(str(len(storages))) + text("cpu") + integer(array.size) + b"tQ")
        out += [text(key), global_("torch._utils", "_rebuild_tensor_v2"), b"(", storage_id, integer(0),
                int_tuple(array.shape), int_tuple(strides), b"\x89", ordered_dict, b"tR"]
        storages.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    out += [b"u", b"."]
    return b"".join(out), storages


def save_state_dict(state_dict: dict[str, np.ndarray], path: os.PathLike | str) -> pathlib.Path:
    """Write ``state_dict`` as ``torch.save(state_dict, path)`` does (the zip format of torch >=
    1.6: ``archive/data.pkl``, ``archive/data/<n>``, ``archive/byteorder``, ``archive/version``),
    atomically, without torch; ``torch.load(path)`` and kdjax's ``load_state_dict`` read it."""
    import tempfile

    path = pathlib.Path(path)
    pkl, storages = _pickle_state_dict(state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", pkl)
            archive.writestr("archive/byteorder", "little")
            for i, raw in enumerate(storages):
                archive.writestr(f"archive/data/{i}", raw)
            archive.writestr("archive/version", "3\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
