"""Read and write the IDX file format of MNIST (``train-images-idx3-ubyte`` and friends).

The format: two zero bytes, a type code, the number of dimensions, one big-endian
uint32 per dimension, then the data in big-endian order. ``.gz`` files are read too.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import torch

from ..errors import DataError

__all__ = ["read_idx", "write_idx"]

# IDX type code -> (torch dtype, big-endian struct/numpy code, bytes per item)
_TYPES = {
    0x08: (torch.uint8, "u1", 1),
    0x09: (torch.int8, "i1", 1),
    0x0B: (torch.int16, ">i2", 2),
    0x0C: (torch.int32, ">i4", 4),
    0x0D: (torch.float32, ">f4", 4),
    0x0E: (torch.float64, ">f8", 8),
}
_CODES = {dtype: code for code, (dtype, _, _) in _TYPES.items()}


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (optionally gzip-compressed) into a tensor.

    Raises:
        DataError: when the file is missing, truncated, not IDX, a damaged gzip file, or
            declares 0 items.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read IDX file {p}: {err.strerror or err}") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt (BadGzipFile is an OSError)
            raise DataError(f"{p} is a damaged gzip file ({type(err).__name__}: {err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number)")
    dtype, code, size = _TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p} is truncated (header needs {header} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        raise DataError(f"{p} holds no samples (its header declares 0 items)")
    if len(raw) - header != count * size:
        raise DataError(f"{p}: header says {count} items of shape {shape}, file holds {(len(raw) - header) // size}")
    import array

    body = raw[header:]
    if size == 1:
        t = torch.frombuffer(bytearray(body), dtype=dtype)
    else:
        # Big-endian on disk: swap to native order through the array module (torch only).
        typecode = {2: "h", 4: "i" if dtype == torch.int32 else "f", 8: "d"}[size]
        arr = array.array(typecode)
        arr.frombytes(body)
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            arr.byteswap()
        t = torch.tensor(arr.tolist(), dtype=dtype) if len(arr) else torch.empty(0, dtype=dtype)
    return t.reshape(shape).clone()


def write_idx(path: str | os.PathLike[str], tensor: torch.Tensor) -> None:
    """Write a tensor as an IDX file (gzip-compressed when the name ends in ``.gz``).

    Raises:
        DataError: for a dtype IDX cannot hold.
    """
    code = _CODES.get(tensor.dtype)
    if code is None:
        raise DataError(f"IDX cannot store dtype {tensor.dtype}")
    _, _, size = _TYPES[code]
    header = bytes([0, 0, code, tensor.ndim]) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if size == 1:
        body = bytes(flat.view(torch.uint8).tolist())
    else:
        import array

        typecode = {2: "h", 4: "i" if tensor.dtype == torch.int32 else "f", 8: "d"}[size]
        arr = array.array(typecode, flat.tolist())
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            arr.byteswap()
        body = arr.tobytes()
    data = header + body
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    Path(path).write_bytes(data)
