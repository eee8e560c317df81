"""The CPU statistics kernel: per-unit counts and sums in one read, compiled from C at first use.

On CPU the pure-torch pass (:func:`deadrelu.core.stats.accumulate`) reads an activation two or
three times (a compare, a count, a magnitude sum), and a ReLU site reads it once more for the
ReLU itself: on a 2-core machine that costs a 5×1024 MLP's scan about 10% of its throughput.
``unit_stats.c`` does the same work in one pass, and for a ReLU writes the output in that pass
too (:func:`relu_stats_into`), as the Triton kernel does on CUDA.

The C source ships with the package and is compiled the first time a CPU batch is counted, with
the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for the instruction set torch
itself uses here (``torch.backends.cpu.get_cpu_capability()``), into a per-user cache
(``$DEADRELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/deadrelu`` or ``~/.cache/deadrelu``, else — a
read-only home — a private ``deadrelu-<uid>`` folder in the temp directory). It takes a few seconds,
once per machine. Without a compiler, or with ``DEADRELU_NO_NATIVE=1``,
nothing changes but speed: the torch pass gives the same counts, and sums equal to rounding.
:func:`status` says which is in use and why.

The numbers: fired and NaN/Inf counts are exact; ``Σ|h|`` is accumulated in float64 (per
element, in a fixed order for ``(rows, units)`` layouts; in vector lanes along a contiguous
``(N, C, H, W)`` run, where the last bits follow the machine's vector width). The kernel is
called through :mod:`ctypes`, which releases the GIL; a large batch is split into row slices
run on torch's number of threads. Subnormal values are read as the calling thread reads them: after
``torch.set_flush_denormal(True)`` they count as 0 in every slice, as a torch compare on that thread
counts them (a worker thread's own flush-to-zero state, set when it was created, is not used).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from . import kernels
from .environment import env_is
from .files import make_temporary, remove_stale_temporaries

__all__ = ["Launch", "available", "prepare", "relu_stats_into", "status", "supports", "unit_stats_into"]

_SOURCES = ("unit_stats.c", "unit_stats_body.h")
_ABI = 4
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# Elements per thread below which a batch runs on one thread: measured on 2 cores, splitting a 4M-value
# activation over Python threads did not pay (torch's idle OpenMP threads spin beside them); 16M did.
_MIN_SLICE_ELEMENTS = 1 << 22
# The kernel counts in int32 within one call over a (rows, units) layout.
_MAX_ROWS_PER_CALL = 1 << 30
_FAILURE: list[str] = []


def status() -> str:
    """One line: whether the compiled kernel counts CPU batches here, and if not, why."""
    if env_is("DEADRELU_NO_NATIVE", "1"):
        return "native CPU kernel off (DEADRELU_NO_NATIVE=1): the torch pass counts CPU batches"
    if available():
        return f"native CPU kernel in use ({_LOADED[-1]})"
    return f"native CPU kernel unavailable ({_FAILURE[0] if _FAILURE else 'unknown'}): the torch pass counts CPU batches"


def available() -> bool:
    """True when the compiled kernel is loaded (compiling it on the first call, once per machine).
    ``DEADRELU_NO_NATIVE=1`` turns it off (for comparisons)."""
    if env_is("DEADRELU_NO_NATIVE", "1"):
        return False
    return _library() is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel counts ``x``: a plain strided CPU tensor of float32/float64/bfloat16/float16
    whose memory it can read (not a tensor of ``torch.func``'s transforms, which has none). A lazily
    negated view is counted from a resolved copy (:func:`deadrelu.core.kernels.plan`) and never
    fused (:func:`deadrelu.core.fused.fusable_layout`)."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in _DTYPES:
        return False
    if x.layout != torch.strided or (_transforms_active() and _functorch_wrapped(x)):
        return False
    return available()


_transforms_active, _functorch_wrapped = kernels.transforms_active, kernels.functorch_wrapped


def _cache_dirs() -> list[Path]:
    """Where the built kernel may live, in order: ``$DEADRELU_CACHE_DIR`` alone when set; else the
    user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``), then a private folder in the temp directory
    for a home that cannot be written (a container's read-only one)."""
    explicit = os.environ.get("DEADRELU_CACHE_DIR")
    if explicit:
        return [Path(explicit)]
    xdg = os.environ.get("XDG_CACHE_HOME")
    user = (Path(xdg) if xdg else Path.home() / ".cache") / "deadrelu"
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return [user, Path(tempfile.gettempdir()) / f"deadrelu-{uid}"]


def _private(folder: Path) -> bool:
    """A shared temp folder is used only where it is ours and no one else may write it: a library
    loaded from there runs with this process's rights."""
    if not hasattr(os, "getuid"):
        return True
    st = folder.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _isa_flags() -> list[str]:
    """Compiler flags for the vector instructions torch's own CPU kernels use on this machine
    (so ``ATEN_CPU_CAPABILITY`` pins both the same way)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # torch < 2.1 has no such query: the baseline instruction set
        return []
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# -fno-trapping-math lets compares be vectorised (no value changes; floating-point exception flags
# are not part of torch's semantics); -ffp-contract=off keeps every sum a plain rounded addition.
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp-simd"]


def _library_name() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    digest.update(" ".join([*_FLAGS, *_isa_flags(), str(_compiler()), platform.platform()]).encode())
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return f"unit_stats-{digest.hexdigest()[:16]}{suffix}"


_LOADED: list[Path] = []  # the file the kernel was loaded from


def _load() -> ctypes.CDLL:
    """Load the kernel from the first cache folder that has it or can build it."""
    name, errors = _library_name(), []
    folders = _cache_dirs()
    for i, folder in enumerate(folders):
        path = folder / name
        try:
            if i > 0:  # the temp-directory fallback
                folder.mkdir(mode=0o700, exist_ok=True)
                if not _private(folder):
                    raise PermissionError(f"{folder} is not private to this user")
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
        except OSError as err:  # an unwritable folder: try the next one
            errors.append(f"{folder}: {err}")
            continue
        if lib.deadrelu_unit_stats_abi() != _ABI:
            raise RuntimeError(f"{path} is an incompatible build")
        _LOADED.append(path)
        return lib
    raise OSError("no cache folder can hold the kernel (" + "; ".join(errors) + ")")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, compiled into the cache first if it is not there; None (reason kept for
    :func:`status`) where no compiler or cache directory works."""
    try:
        lib = _load()
    except Exception as err:  # no compiler, a read-only home, a broken toolchain: torch counts instead
        _FAILURE.append(f"{type(err).__name__}: {str(err)[:300]}")
        return None
    fn = lib.deadrelu_unit_stats
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, ptr, ptr, *[i64] * 8, ctypes.c_double, *[ctypes.c_int] * 3, *[ptr] * 4]
    fn.restype = ctypes.c_int
    lib.deadrelu_flush_mode.argtypes, lib.deadrelu_flush_mode.restype = [], ctypes.c_int
    return lib


def _compile(path: Path) -> None:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    # A first scan pauses a few seconds here, once per machine: say why to whoever logs deadrelu.
    logging.getLogger("deadrelu").info("compiling the CPU statistics kernel into %s (once per machine)", path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    here = Path(__file__).parent
    # Built under a unique name and renamed into place: processes that compile at once never
    # load a half-written file. What a build killed outright left there is removed first.
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = make_temporary(path)
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, *_isa_flags(), str(here / "unit_stats.c"), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {done.stderr.strip()[-300:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check(rc: int, dtype: torch.dtype) -> None:
    if rc == -2:
        raise MemoryError("the native statistics kernel could not allocate its per-unit counters")
    if rc != 0:
        raise RuntimeError(f"the native statistics kernel refused dtype {dtype}")


def _zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Plain zeros, also inside ``torch.func`` transforms (whose tensors have no readable memory)."""
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    if disable is None:
        return torch.zeros(shape, dtype=dtype)
    with disable():
        return torch.zeros(shape, dtype=dtype)


_POOLS: dict[int, "concurrent.futures.ThreadPoolExecutor"] = {}


def _pool() -> "concurrent.futures.ThreadPoolExecutor":
    """One pool per process, as wide as the machine; a batch uses as many slices as torch's threads.
    Keyed by process id: a forked child (a DataLoader worker) inherits the pool without its threads."""
    import concurrent.futures

    pid = os.getpid()
    pool = _POOLS.get(pid)
    if pool is None:
        _POOLS.clear()
        pool = _POOLS[pid] = concurrent.futures.ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix="deadrelu-stats"
        )
    return pool


_ACCUMULATOR_DTYPES = (torch.int64, torch.float64, torch.int64, torch.int64)


def _direct(out: Mapping[str, torch.Tensor], units: int) -> bool:
    """Whether the kernel may add into ``out`` itself: contiguous CPU tensors of the right kind
    (``units`` entries, and one observation count) that own readable memory."""
    ts = (out["fired"], out["abs_sum"], out["nonfinite"], out["observations"])
    for t, dtype in zip(ts, _ACCUMULATOR_DTYPES):
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            return False
    if ts[0].numel() != units or ts[1].numel() != units or ts[2].numel() != units or ts[3].numel() != 1:
        return False
    return not _transforms_active() or not any(type(t) is not torch.Tensor or _functorch_wrapped(t) for t in ts)


def _run(
    layout: tuple[torch.Tensor, int, int, int, int, int, int],
    y: torch.Tensor | None,
    threshold: float,
    nonnegative: bool,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None,
) -> None:
    t, before, units, after, s_b, s_u, s_a = layout
    lib = _library()
    assert lib is not None, "supports() is checked before"
    fn = lib.deadrelu_unit_stats
    code = _DTYPES[t.dtype]
    if mask is None:
        mask_arg, mask_ptr, mask_div = None, None, 1
    else:
        mask_arg, mask_div = kernels.mask_rows(mask, before)
        mask_ptr = mask_arg.data_ptr()
    x_ptr, y_ptr = t.data_ptr(), (None if y is None else y.data_ptr())
    relu, nonneg, thr = int(y is not None), int(bool(nonnegative)), float(threshold)
    slices = max(1, min(torch.get_num_threads(), before, t.numel() // _MIN_SLICE_ELEMENTS))
    step = min(-(-before // slices), _MAX_ROWS_PER_CALL)
    bounds = [(b, min(b + step, before)) for b in range(0, before, step)]

    if len(bounds) == 1 and _direct(out, units):
        rc = fn(code, x_ptr, y_ptr, mask_ptr, 0, before, units, after, s_b, s_u, s_a, mask_div, thr, relu, nonneg, -1,
                out["fired"].data_ptr(), out["abs_sum"].data_ptr(), out["nonfinite"].data_ptr(),
                out["observations"].data_ptr())  # fmt: skip
        _check(rc, t.dtype)
        return

    # Several slices (threads, or more rows than one call counts), or accumulators the kernel cannot
    # address: each slice adds into its own row of partial sums, added up in slice order, so the
    # result does not depend on thread timing. Every slice counts under this thread's flush-to-zero
    # state (torch.set_flush_denormal): a worker thread keeps the one it was created with.
    n = len(bounds)
    flush = lib.deadrelu_flush_mode()
    fired, mag = _zeros(n, units, dtype=torch.int64), _zeros(n, units, dtype=torch.float64)
    bad, obs = _zeros(n, units, dtype=torch.int64), _zeros(n, dtype=torch.int64)
    codes: list[int] = [0] * n

    def one(i: int) -> None:
        b0, b1 = bounds[i]
        codes[i] = fn(code, x_ptr, y_ptr, mask_ptr, b0, b1, units, after, s_b, s_u, s_a, mask_div, thr, relu, nonneg,
                      flush, fired[i].data_ptr(), mag[i].data_ptr(), bad[i].data_ptr(), obs[i:].data_ptr())  # fmt: skip

    if n > 1 and torch.get_num_threads() > 1:
        list(_pool().map(one, range(n)))
    else:
        for i in range(n):
            one(i)
    for rc in codes:
        _check(rc, t.dtype)
    del mask_arg  # (kept alive until every slice has run)
    out["fired"] += fired.sum(0)
    out["abs_sum"] += mag.sum(0)
    out["nonfinite"] += bad.sum(0)
    out["observations"] += obs.sum()


def unit_stats_into(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    nonnegative: bool,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
) -> None:
    """Add one batch's statistics into ``out``; the contract of
    :func:`deadrelu.core.kernels.unit_stats_into`, for a CPU tensor that :func:`supports` holds for."""
    _run(kernels.plan(x, unit_dim), None, threshold, nonnegative, out, mask)


def relu_stats_into(
    x: torch.Tensor,
    unit_dim: int,
    threshold: float,
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor | None:
    """``relu(x)`` with its statistics added into ``out`` in the same pass; the contract of
    :func:`deadrelu.core.kernels.relu_stats_into` (None, doing nothing, for a layout it would copy)."""
    made = kernels.relu_output(x, unit_dim, inplace)
    if made is None:
        return None
    _run(made[0], made[1], threshold, True, out, mask)
    return made[1]


class Launch:
    """:func:`unit_stats_into` (or :func:`relu_stats_into`) for tensors of one layout into one
    accumulator's state, its kernel arguments worked out once: a site's batches repeat their
    layout, and on a small model the checks and ctypes conversions of the general call cost as
    much as the kernel. A call is one foreign call with prebuilt arguments (and, for a ReLU, an
    ``empty_like`` for its output). Made by :func:`prepare`; it adds into the state tensors it was
    made for (:meth:`adds_into` says whether they still are).
    """

    __slots__ = ("_args", "_dtype", "_fn", "_relu", "_state")

    def __init__(self, fn: object, args: list[object], dtype: torch.dtype, state: tuple[torch.Tensor, ...], relu: bool) -> None:  # fmt: skip
        self._fn, self._args, self._dtype, self._state, self._relu = fn, args, dtype, state, relu

    def adds_into(self, out: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``out`` holds the state tensors this launch adds into (a moved or replaced state does not)."""
        fired, mag, bad, obs = self._state
        return out.get("fired") is fired and out.get("abs_sum") is mag and out.get("nonfinite") is bad and (
            out.get("observations") is obs
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """Count ``x`` (of the layout the launch was made for); for a ReLU launch, return ``relu(x)``."""
        args = self._args.copy()  # (a copy: two threads may call one launch)
        args[1] = ctypes.c_void_p(x.data_ptr())
        y = None
        if self._relu:
            y = torch.empty_like(x)  # dense: the strides of x, as torch.relu's output has
            args[2] = ctypes.c_void_p(y.data_ptr())
        rc = self._fn(*args)  # type: ignore[operator]
        if rc:
            _check(rc, self._dtype)
        return y


def prepare(
    x: torch.Tensor, unit_dim: int, threshold: float, nonnegative: bool, out: Mapping[str, torch.Tensor], relu: bool
) -> Launch | None:
    """A :class:`Launch` doing for ``x``'s layout what :func:`unit_stats_into` (``relu``:
    :func:`relu_stats_into`) does, without a mask, or None where that call would do more than one
    direct kernel call on ``x`` itself: a layout it copies (or, for a ReLU, leaves to torch), a
    batch it splits over threads, or accumulators it cannot add into. ``unit_dim`` counts from the front."""
    lib = _library()
    if lib is None:
        return None
    if relu:
        made = kernels.relu_output(x, unit_dim, False)
        if made is None:
            return None
        layout = made[0]
    else:
        layout = kernels.plan(x, unit_dim)
    t, before, units, after, s_b, s_u, s_a = layout
    if t is not x or max(1, min(torch.get_num_threads(), before, t.numel() // _MIN_SLICE_ELEMENTS)) != 1:
        return None
    if before > _MAX_ROWS_PER_CALL or not _direct(out, units):
        return None
    state = (out["fired"], out["abs_sum"], out["nonfinite"], out["observations"])
    values = (_DTYPES[t.dtype], None, None, None, 0, before, units, after, s_b, s_u, s_a, 1, float(threshold), int(relu),
              int(relu or bool(nonnegative)), -1, *(s.data_ptr() for s in state))  # fmt: skip
    # The arguments as objects of the entry point's declared types (_library's argtypes), called
    # through a function object without argtypes, which passes them as they are: no conversions per call.
    shared = lib.deadrelu_unit_stats
    args: list[object] = [kind(v) for kind, v in zip(shared.argtypes, values)]
    fn = lib["deadrelu_unit_stats"]  # (indexing gives a new function object: the shared one keeps its argtypes)
    fn.restype = shared.restype
    return Launch(fn, args, t.dtype, state, relu)
