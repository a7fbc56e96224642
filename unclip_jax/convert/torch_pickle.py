"""`torch.save` checkpoints (.pt/.pth) as NumPy arrays: read without torch, running no code.

Since torch 1.6, `torch.save` writes a zip archive:
  <root>/data.pkl       the pickled object; each tensor is a call to torch._utils._rebuild_tensor_v2
                        (storage, offset, size, stride, ...) whose storage is a persistent id
                        ("storage", <dtype>Storage, key, location, numel)
  <root>/data/<key>     the raw bytes of each storage
  <root>/byteorder      "little" or "big" (absent in old files: little)

The pickle is read by an Unpickler that resolves only the globals a state dict needs (OrderedDict,
the tensor and parameter rebuild functions, the typed storage classes) to our own stand-ins, and
refuses every other global with a ConversionError naming it, so a malicious file cannot reach
`os.system` or any other callable. Tensors come back as NumPy arrays of their own dtype, except
bfloat16, which NumPy lacks: it is widened to float32 exactly (bit shift).

    state = load_torch_state_dict("base.pt")    # {"input_blocks.0.0.weight": ndarray, ...}
"""

from __future__ import annotations

import collections
import functools
import io
import pathlib
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from unclip_jax.convert.common import ConversionError

# torch's typed storage classes -> the NumPy dtype of their elements ("bfloat16" is read as uint16
# and widened afterwards).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
# The pickle that torch's legacy (pre-1.6) format starts with: protocol 2, then its magic number.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
# Nested checkpoints: {"state_dict": {...}, "epoch": 3} and the like.
_WRAPPER_KEYS = ("state_dict", "model")


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for torch.<Name>Storage: only its element dtype matters."""

    name: str
    dtype: str

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class _Storage:
    """A loaded storage: its elements as a flat array (uint16 bit patterns for bfloat16)."""

    kind: _StorageType
    flat: np.ndarray


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values, exactly (bf16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _as_ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) for v in value):
        raise ConversionError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:  # fmt: skip
    """torch._utils._rebuild_tensor_v2: a (possibly strided, offset) view of a storage, copied."""
    del requires_grad, backward_hooks  # autograd state: irrelevant for weights
    if not isinstance(storage, _Storage):
        raise ConversionError(f"tensor storage is {type(storage).__name__}, not a saved storage")
    if metadata:  # conj / neg bits: a lazily negated or conjugated view we would get wrong
        raise ConversionError(f"tensors with metadata {metadata!r} are not supported")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ConversionError(f"bad tensor storage offset {storage_offset!r}")
    shape, strides = _as_ints(size, "size"), _as_ints(stride, "stride")
    if len(shape) != len(strides) or any(s < 0 for s in shape + strides):
        raise ConversionError(f"tensor size {shape} and stride {strides} do not match")
    flat = storage.flat
    if 0 in shape:
        out = np.zeros(shape, flat.dtype)
    else:
        # The last element the view touches must lie inside the storage.
        end = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
        if end > flat.size:
            raise ConversionError(
                f"tensor of size {shape}, stride {strides}, offset {storage_offset} reads past "
                f"its storage of {flat.size} elements (truncated checkpoint?)"
            )
        if storage_offset == 0 and end == flat.size and strides == _contiguous_strides(shape):
            out = flat.reshape(shape)  # the whole storage (the usual case): share it, as torch does
        else:
            view = np.lib.stride_tricks.as_strided(
                flat[storage_offset:], shape, tuple(s * flat.itemsize for s in strides),
                writeable=False,
            )  # fmt: skip
            out = np.array(view, copy=True)
    return _widen_bfloat16(out) if storage.kind.dtype == "bfloat16" else out


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is just its data here."""
    del requires_grad, backward_hooks, state
    return data


def _fresh(fn):
    return lambda: functools.partial(fn)


# The only globals a state dict's pickle may name. Each lookup gets a fresh object (a partial of
# our function, a new storage type), so what a pickle does to them (BUILD sets attributes) stays
# inside that one load.
_ALLOWED = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _fresh(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _fresh(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _fresh(_rebuild_parameter),
} | {
    ("torch", name): functools.partial(_StorageType, name, dtype)
    for name, dtype in _STORAGE_DTYPES.items()
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in _ALLOWED and storages from the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str,
                 source: str):  # fmt: skip
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._archive, self._root, self._byteorder = archive, root, byteorder
        self._source = source
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        make = _ALLOWED.get((module, name))
        if make is not None:
            return make()
        hint = ""
        if module.startswith(("torch.nn", "__torch__", "__main__")):
            hint = " (the file pickles a model object: save its state_dict() instead)"
        raise ConversionError(
            f"{self._source}: refusing to unpickle {module}.{name}: only tensors, storages and "
            f"plain containers are allowed in a weights file{hint}"
        )

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            pid = (pid[0].decode("ascii"),) + pid[1:]
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConversionError(f"{self._source}: unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        valid = isinstance(kind, _StorageType) and kind.dtype in _STORAGE_DTYPES.values()
        if not valid or not isinstance(numel, int) or numel < 0:
            raise ConversionError(f"{self._source}: bad storage reference {pid!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(kind, key, numel)
        return self._storages[key]

    def _read_storage(self, kind: _StorageType, key: str, numel: int) -> _Storage:
        name = f"{self._root}/data/{key}"
        try:
            size = self._archive.getinfo(name).file_size
        except KeyError:
            raise ConversionError(
                f"{self._source}: storage {name} is missing from the archive (truncated file?)"
            ) from None
        nbytes = numel * kind.itemsize
        if size < nbytes:
            raise ConversionError(f"{self._source}: storage {name} has {size} bytes, expected "
                                  f"{nbytes}")  # fmt: skip
        # Read into a writable buffer once: whole-storage tensors are then views of it, not copies.
        buffer = bytearray(nbytes)
        with self._archive.open(name) as f:
            f.readinto(buffer)
        dtype = np.dtype("uint16" if kind.dtype == "bfloat16" else kind.dtype)
        order = ">" if self._byteorder == "big" else "<"
        flat = np.frombuffer(buffer, dtype.newbyteorder(order), count=numel)
        return _Storage(kind, flat.astype(dtype.newbyteorder("="), copy=False))


def _archive_root(archive: zipfile.ZipFile, source: str) -> str:
    roots = [n[: -len("/data.pkl")] for n in archive.namelist()
             if n.endswith("/data.pkl") and n.count("/") == 1]  # fmt: skip
    if len(roots) != 1:
        raise ConversionError(f"{source}: a zip archive without a single <root>/data.pkl: not a "
                              "torch.save checkpoint")  # fmt: skip
    return roots[0]


def load_torch_checkpoint(path: str | pathlib.Path):
    """The object a `torch.save` zip checkpoint holds, tensors as NumPy arrays (see module doc).

    Raises ConversionError for legacy (pre-1.6) files, refused globals and damaged archives.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        what = "not a zip archive, so not the format torch.save writes since torch 1.6"
        if head == _LEGACY_MAGIC:
            what = "torch's legacy (pre-1.6) serialization format"
        raise ConversionError(
            f"{path} is {what}. Re-save it with a current torch "
            "(torch.save(torch.load(old), new)) or export it to safetensors."
        )
    with zipfile.ZipFile(path) as archive:
        root = _archive_root(archive, str(path))
        names = set(archive.namelist())
        byteorder = "little"
        if f"{root}/byteorder" in names:
            byteorder = archive.read(f"{root}/byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise ConversionError(f"{path}: unknown byteorder record {byteorder!r}")
        data = archive.read(f"{root}/data.pkl")
        unpickler = _RestrictedUnpickler(data, archive, root, byteorder, str(path))
        try:
            return unpickler.load()
        except ConversionError:
            raise
        except Exception as err:  # malformed pickles fail in many ways; none is a usable file
            raise ConversionError(f"{path}: cannot unpickle data.pkl ({err!r})") from None


def _unwrap(obj, source: str):
    """The state dict inside a nested checkpoint ({"state_dict": {...}, "epoch": 3, ...})."""
    while isinstance(obj, dict) and not all(isinstance(v, np.ndarray) for v in obj.values()):
        nested = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if len(nested) > 1:
            raise ConversionError(f"{source}: ambiguous checkpoint: both {nested} hold dicts; "
                                  "save the state dict alone")  # fmt: skip
        if not nested:
            break
        obj = obj[nested[0]]
    return obj


def load_torch_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{name: array} from a torch.save'd state dict (or a checkpoint nesting one, unambiguously
    under "state_dict" or "model"). Every value must be a tensor; the error names one that is not.
    """
    obj = _unwrap(load_torch_checkpoint(path), str(path))
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ConversionError(f"{path}: state dict key {key!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise ConversionError(f"{path}: {key!r} is a {type(value).__name__}, expected a tensor")
    return dict(obj)
