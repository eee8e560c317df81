"""The Triton statistics kernel compiles for real GPUs, for every launch the engine can ask for.

The interpreter (``TRITON_INTERPRET=1``, tests/core/test_kernels.py) checks the kernel's numbers on
CPU tensors, but it never compiles: code that only a GPU compile rejects — bfloat16, which the
interpreter cannot run at all, an atomic of a type the target lacks, a tile too large for its
registers — would first fail on a user's GPU. Triton compiles ahead of time without a GPU, down to
the machine code (``cubin``, through the ``ptxas`` it ships), so each launch configuration that
:func:`deadrelu.core.kernels.launch_config` gives is compiled here for an H100 (sm_90) and an A100
(sm_80), with its arguments typed as Triton's JIT types them at a launch.
"""

from __future__ import annotations

import pytest
import torch

from deadrelu.core import kernels

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends import backends as _backends
except ImportError:  # Triton 2 has no ahead-of-time API of this shape (and the engine needs Triton 3)
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)
if "nvidia" not in _backends:
    pytest.skip("this Triton build has no NVIDIA backend", allow_module_level=True)

_POINTER = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_SMS = {90: 132, 80: 108}  # streaming multiprocessors of an H100 SXM and an A100

# Activation layouts the engine meets: units last (MLP, (B, T, C)), few units, a feature map in
# NCHW and channels_last, and (through a layout of its own, no tensor that large) 2**31 rows or more.
_SHAPES = {
    "mlp 8192x4096": ((8192, 4096), None),
    "tokens 4x128x768": ((4, 128, 768), None),
    "3 units": ((256, 3), None),
    "nchw 8x64x14x14": ((8, 64, 14, 14), None),
    "channels_last 8x64x14x14": ((8, 64, 14, 14), torch.channels_last),
}


def _layouts(dtype: torch.dtype) -> list[tuple[str, tuple]]:
    out = []
    for name, (shape, memory_format) in _SHAPES.items():
        x = torch.empty(shape, dtype=dtype) if memory_format is None else torch.empty(shape, dtype=dtype).to(memory_format=memory_format)
        out.append((name, kernels.plan(x, 1 if len(shape) == 4 else -1)))
    empty = torch.empty(0, dtype=dtype)
    out.append(("2**31 rows", (empty, 2**31 + 5, 1024, 1, 1024, 1, 0)))
    return out


def _typed(name: str, value: int) -> tuple[str, int | None]:
    """How Triton's JIT types an int argument at a launch: 1 becomes a constant, others i32 or i64."""
    if value == 1:
        return "constexpr", 1
    return ("i32" if -(2**31) <= value < 2**31 else "i64"), None


def _compile(dtype: torch.dtype, layout: tuple, relu: bool, nonnegative: bool, masked: bool, arch: int):
    grid, scalars, constexprs = kernels.launch_config(layout, relu, nonnegative, masked, 4 * _SMS[arch])
    signature = {
        "x_ptr": _POINTER[dtype], "y_ptr": _POINTER[dtype], "mask_ptr": "*u8",
        "thr_ptr": "*fp64" if dtype == torch.float64 else "*fp32",
        "fired_ptr": "*i64", "abs_ptr": "*fp64", "bad_ptr": "*i64", "obs_ptr": "*i64",
    }  # fmt: skip
    given = dict(constexprs)
    names = ("units", "after", "rows", "rows_per_prog", "s_b", "s_u", "s_a", "mask_div")
    values = (*scalars, 2 if masked else 1)
    for name, value in zip(names, values):
        signature[name], constant = _typed(name, value)
        if constant is not None:
            given[name] = constant
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(kernels._kernel(False), signature, constexprs=given)
    return grid, triton.compile(source, target=GPUTarget("cuda", arch, 32))


# (relu, nonnegative, masked): a signed activation's statistics, and a fused, masked ReLU — every
# layout gets both; the two others (a nonnegative activation's statistics, an unmasked ReLU) one layout.
_EVERY_LAYOUT = ((False, False, False), (True, True, True))
_ONE_LAYOUT = ((False, True, True), (True, True, False))


@pytest.mark.parametrize(
    "arch, dtype",
    [(90, torch.float32), (90, torch.bfloat16), (90, torch.float16), (90, torch.float64), (80, torch.bfloat16)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_every_launch_of_the_kernel_compiles_to_gpu_machine_code(arch, dtype):
    layouts = _layouts(dtype)
    if arch == 80:  # the A100 gets the main shapes only: each compile takes a fraction of a second
        layouts = [(name, layout) for name, layout in layouts if name.startswith(("mlp", "channels_last", "2**31"))]
    cases = [(name, layout, variant) for name, layout in layouts for variant in _EVERY_LAYOUT]
    cases += [(layouts[0][0], layouts[0][1], variant) for variant in _ONE_LAYOUT]
    for name, layout, (relu, nonnegative, masked) in cases:
        grid, kernel = _compile(dtype, layout, relu, nonnegative, masked, arch)
        assert kernel.asm["cubin"], f"{name}: no machine code"
        assert grid[0] >= 1 and grid[1] >= 1
        assert kernel.metadata.shared <= 228 * 1024, f"{name}: more shared memory than the GPU has"


def test_the_launch_config_covers_each_unit_once_and_each_row_once():
    """The grid's unit blocks cover the units, and its row slices the rows, with no slice empty."""
    for dtype in (torch.float32, torch.bfloat16):
        for name, layout in _layouts(dtype):
            _, before, units, after, *_ = layout
            (unit_blocks, row_progs), scalars, constexprs = kernels.launch_config(layout, True, True, False, 4 * 132)
            rows, rows_per_prog = scalars[2], scalars[3]
            assert rows == before * after
            assert (unit_blocks - 1) * constexprs["BLOCK_U"] < units <= unit_blocks * constexprs["BLOCK_U"], name
            assert (row_progs - 1) * rows_per_prog < rows <= row_progs * rows_per_prog, name
            assert rows_per_prog % constexprs["BLOCK_R"] == 0, name
            assert constexprs["LARGE"] == (name == "2**31 rows"), name
