"""GPU benchmark: scan throughput, scan memory and monitored training-step cost on real architectures.

    python benchmarks/bench_gpu.py [--dtypes fp32 bf16] [--models mlp resnet50 ...] [--repeats 5]
                                   [--steps 20] [--json results.json] [--no-compile] [--budget-s S]
    python benchmarks/bench_gpu.py --cpu-smoke      # tiny sizes on CPU: exercises every code path

Models (random weights): MLP 5x4096 (batch 8192), ResNet-50 channels_last (batch 256), ViT-B/16,
BERT-base, GPT-2 small and a Llama-style ~1B model (16 layers x 2048, FFN 5632). Model code
comes from torchvision / transformers when installed (``pip install "deadrelu[gpu-bench]"``), else
from hand-written equivalents here.

Measured per model and dtype, each ratio side by side in one process (runs interleaved,
median over ``--repeats``):

* scan ratio = plain ``no_grad`` inference time ÷ ``deadrelu.scan`` time over the same
  batches (1.00 = free; target >= 0.93);
* extra MiB = peak GPU memory of the scan minus peak of plain inference (target <= 64 MiB + O(units));
* monitor eager = a training step (AdamW; bf16 autocast for the bf16 rows) with an
  every-step ``deadrelu.Monitor`` ÷ the same step without (target <= 1.03);
* monitor compiled = the same with ``torch.compile`` and ``Monitor(compiled=True)`` ÷ the
  compiled step without (target <= 1.01).

Prints a table and, with ``--json``, writes the numbers. Without CUDA it says so and exits
(status 0) unless ``--cpu-smoke`` is given; smoke numbers are not benchmark results.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import deadrelu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- models -------------------------------------------------------------------------------------


def mlp(width: int, depth: int = 5) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: one ReLU module called three times."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


def resnet(blocks: tuple[int, ...] = (3, 4, 6, 3), base: int = 64) -> nn.Module:
    """ResNet-50 (torchvision's when installed; this layout otherwise)."""
    if blocks == (3, 4, 6, 3) and base == 64 and importlib.util.find_spec("torchvision"):
        import torchvision

        return torchvision.models.resnet50()
    layers: list[nn.Module] = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(3, 2, 1))
    cin = base
    for i, n in enumerate(blocks):
        width = base * 2**i
        for j in range(n):
            layers.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
            cin = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


class Block(nn.Module):
    """A pre-norm transformer block: GELU MLP, or SwiGLU (``gated``) as in Llama."""

    def __init__(self, dim: int, heads: int, ffn: int, gated: bool, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal, self.gated = heads, causal, gated
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * ffn if gated else ffn)
        self.down = nn.Linear(ffn, dim)
        self.act = nn.SiLU() if gated else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.up(self.norm2(x))
        if self.gated:
            gate, h = h.chunk(2, dim=-1)
            h = self.act(gate) * h
        else:
            h = self.act(h)
        return x + self.down(h)


class Transformer(nn.Module):
    """Hand-written stand-in for ViT / BERT / GPT-2 / Llama when transformers is absent."""

    def __init__(self, dim: int, depth: int, heads: int, ffn: int, vocab: int = 0, patch: int = 0, gated: bool = False, causal: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch) if patch else nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, ffn, gated, causal) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if h.ndim == 4:
            h = h.flatten(2).transpose(1, 2)
        return self.norm(self.blocks(h))


def _hf(kind: str, tiny: bool) -> nn.Module | None:
    """The transformers implementation with random weights, or None when it is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers as tf

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else {}
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(image_size=32 if tiny else 224, patch_size=16, **small), add_pooling_layer=False)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(**small), add_pooling_layer=False)
    if kind == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128) if tiny else {}
        # GPT-2's own "gelu_new" is the tanh GELU written out in tanh/pow calls, which no
        # activation capture can name; "gelu_pytorch_tanh" is the same function as one F.gelu call.
        return tf.GPT2LMHeadModel(tf.GPT2Config(activation_function="gelu_pytorch_tanh", **cfg))
    big = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32000, **(small if tiny else big)))


def _fallback(kind: str, tiny: bool) -> nn.Module:
    dims = {"vit": (768, 12, 12, 3072), "bert": (768, 12, 12, 3072), "gpt2": (768, 12, 12, 3072), "llama": (2048, 16, 16, 5632)}
    dim, depth, heads, ffn = (64, 2, 4, 128) if tiny else dims[kind]
    if kind == "vit":
        return Transformer(dim, depth, heads, ffn, patch=16)
    vocab = 32000 if kind == "llama" else (30522 if kind == "bert" else 50257)
    return Transformer(dim, depth, heads, ffn, vocab=vocab, gated=kind == "llama", causal=kind != "bert")


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device, torch.dtype], torch.Tensor]  # one input batch
    channels_last: bool = False


def cases(tiny: bool) -> list[Case]:
    """The benchmark models; ``tiny`` shrinks every size for the CPU smoke run."""
    b_img, res, b_vit, b_seq, seq = (4, 32, 2, 2, 16) if tiny else (256, 224, 64, 32, 512)
    width, b_mlp = (64, 32) if tiny else (4096, 8192)

    def image(n: int, size: int) -> Callable[[torch.device, torch.dtype], torch.Tensor]:
        return lambda dev, dt: torch.randn(n, 3, size, size, device=dev, dtype=dt)

    def tokens(n: int, t: int, vocab: int) -> Callable[[torch.device, torch.dtype], torch.Tensor]:
        return lambda dev, dt: torch.randint(0, vocab, (n, t), device=dev)

    def transformer(kind: str) -> Callable[[], nn.Module]:
        return lambda: _hf(kind, tiny) or _fallback(kind, tiny)

    return [
        Case("MLP 5x4096", lambda: mlp(width), lambda dev, dt: torch.randn(b_mlp, width, device=dev, dtype=dt)),
        Case("ResNet-50 (channels_last)", lambda: resnet((1, 1, 1, 1), 8) if tiny else resnet(), image(b_img, res), True),
        Case("ViT-B/16", transformer("vit"), image(b_vit, res)),
        Case("BERT-base", transformer("bert"), tokens(b_seq, seq, 30522)),
        Case("GPT-2 small", transformer("gpt2"), tokens(b_seq, seq, 50257)),
        Case("Llama-style ~1B", transformer("llama"), tokens(max(b_seq // 4, 1), seq, 32000)),
    ]


# -- measurements -------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated MiB while ``fn`` runs (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _output_tensor(out: object) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    assert isinstance(out, torch.Tensor)
    return out


def scan_numbers(model: nn.Module, batches: list[torch.Tensor], repeats: int, device: torch.device) -> dict[str, float | None]:
    """Scan throughput ratio and extra peak memory against plain ``no_grad`` inference."""

    def plain() -> None:
        with torch.no_grad():
            for xb in batches:
                model(xb)

    def scan() -> None:
        deadrelu.scan(model, batches)

    plain(), scan()  # warm-up: kernels, allocator, Triton compilation
    ratios = []
    for _ in range(repeats):
        ratios.append(_timed(plain, device) / _timed(scan, device))
    peak_plain, peak_scan = _peak(plain, device), _peak(scan, device)
    extra = None if peak_plain is None or peak_scan is None else peak_scan - peak_plain
    return {"scan_ratio": statistics.median(ratios), "scan_extra_mib": extra}


def _train_steps(model: nn.Module, x: torch.Tensor, steps: int, autocast: bool, mon: deadrelu.Monitor | None, opt: torch.optim.Optimizer) -> None:  # fmt: skip
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = _output_tensor(model(x)).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            mon.step(loss)


def monitor_ratio(build: Callable[[], nn.Module], x: torch.Tensor, steps: int, repeats: int, autocast: bool, compiled: bool) -> float:  # fmt: skip
    """Median over repeats of (monitored step time ÷ plain step time), interleaved."""
    device = x.device
    base = build().to(device)
    watched = copy.deepcopy(base)
    runs = {"plain": base, "monitor": watched}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in (("plain", base), ("monitor", watched))}
    if compiled:
        # TorchDynamo shares one graph between instances of a class: the plain copy gets a class
        # of its own and is compiled before the monitor's graph pass is installed.
        base.__class__ = type(f"Plain{type(base).__name__}", (type(base),), {})
        runs["plain"] = torch.compile(base)
        _train_steps(runs["plain"], x, 2, autocast, None, opts["plain"])
    mon = deadrelu.Monitor(watched, window=100, log_every=10, compiled=True if compiled else None).attach()
    if compiled:
        runs["monitor"] = torch.compile(watched)
    mons = {"plain": None, "monitor": mon}
    try:
        for k in runs:  # warm-up (and compilation)
            _train_steps(runs[k], x, 2, autocast, mons[k], opts[k])
        ratios = []
        for _ in range(repeats):
            t = {k: _timed(lambda k=k: _train_steps(runs[k], x, steps, autocast, mons[k], opts[k]), device) for k in runs}
            ratios.append(t["monitor"] / t["plain"])
        observed = mon.report("total").batches
    finally:
        mon.detach()
    expected = 2 + steps * repeats
    if observed != expected:  # a ratio of an unobserved run would mean nothing
        raise RuntimeError(f"the monitored copy recorded {observed} of {expected} steps")
    return statistics.median(ratios)


def _rows_sums(fn: Callable[[], object]) -> object:
    """Run ``fn`` with the Triton kernel's per-tile row reduction (the other variant, for A/B)."""
    os.environ["DEADRELU_TRITON_SUMS"] = "rows"
    try:
        return fn()
    finally:
        del os.environ["DEADRELU_TRITON_SUMS"]


def kernel_numbers(device: torch.device, repeats: int) -> list[str]:
    """The statistics pass alone against a bare ReLU over the same tensor (the one-read limit):
    effective GB/s of each backend, on the issue's bf16 MLP activation and a channels_last one,
    and the fused ReLU (the ReLU and its statistics in one kernel) against the bare ReLU."""
    from deadrelu.core import stats

    lines = []
    shapes = [((8192, 4096), 1, False), ((256, 256, 56, 56), 1, True)] if device.type == "cuda" else [((64, 32), 1, False)]
    for shape, unit_dim, cl in shapes:
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        x = x.to(memory_format=torch.channels_last) if cl else x
        out = stats.StatTensors(x.shape[unit_dim], device).state
        runs = {"relu": lambda: torch.relu(x)}
        for backend in ("torch", "triton") if device.type == "cuda" else ("torch",):
            runs[backend] = lambda b=backend: stats.accumulate(x, unit_dim, 0.0, False, out, backend=b)
        if device.type == "cuda":  # the ReLU that counts its own output: its cost over the bare ReLU
            runs["fused relu"] = lambda: stats.relu_accumulate(x, unit_dim, 0.0, out, backend="triton")
            # A/B: the kernel that reduces each tile's rows as it goes (DEADRELU_TRITON_SUMS=rows)
            runs["triton rows"] = lambda: _rows_sums(lambda: stats.accumulate(x, unit_dim, 0.0, False, out, backend="triton"))
            runs["fused relu rows"] = lambda: _rows_sums(lambda: stats.relu_accumulate(x, unit_dim, 0.0, out, backend="triton"))
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                times[k].append(_timed(lambda fn=fn: [fn() for _ in range(10)], device) / 10)
        gbs = {k: x.numel() * x.element_size() / statistics.median(v) / 1e9 for k, v in times.items()}
        ratio = {k: statistics.median(times[k]) / statistics.median(times["relu"]) for k in runs}
        lines.append(
            f"stats pass {tuple(shape)} bf16{' channels_last' if cl else ''}: "
            + ", ".join(f"{k} {gbs[k]:.0f} GB/s ({ratio[k]:.2f}x relu)" for k in runs)
        )
    return lines


@dataclass
class Row:
    model: str
    dtype: str
    scan_ratio: float | None = None
    scan_extra_mib: float | None = None
    monitor_eager: float | None = None
    monitor_compiled: float | None = None
    note: str = ""


def measure(case: Case, dtype_name: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Every number of one table row (errors become a note, so one model cannot stop the run)."""
    row = Row(case.name, dtype_name)
    dtype = DTYPES[dtype_name]
    try:
        model = case.build().to(device)
        model = (model.to(dtype) if dtype != torch.float32 else model).eval()
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt) if case.channels_last else model
        batches = [case.batch(device, dtype).contiguous(memory_format=fmt) for _ in range(args.batches)]
        row.scan_ratio, row.scan_extra_mib = scan_numbers(model, batches, args.repeats, device).values()  # type: ignore[assignment]
        del model
        x = case.batch(device, torch.float32).contiguous(memory_format=fmt)
        autocast = dtype == torch.bfloat16

        def build() -> nn.Module:
            return case.build().to(memory_format=fmt) if case.channels_last else case.build()

        row.monitor_eager = monitor_ratio(build, x, args.steps, args.repeats, autocast, compiled=False)
        if args.compile and (not args.cpu_smoke or case.name.startswith("MLP")):
            row.monitor_compiled = monitor_ratio(build, x, args.steps, args.repeats, autocast, compiled=True)
    except Exception as err:  # report the failure in the table and keep going
        row.note = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[Row]) -> str:
    head = f"{'model':27s} {'dtype':5s} {'scan ratio':>10s} {'extra MiB':>10s} {'monitor eager':>13s} {'monitor compiled':>16s}  note"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.model:27s} {r.dtype:5s} {_fmt(r.scan_ratio, '.3f'):>10s} {_fmt(r.scan_extra_mib, '.0f'):>10s} "
            f"{_fmt(r.monitor_eager, '.3f'):>13s} {_fmt(r.monitor_compiled, '.3f'):>16s}  {r.note}"
        )
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    """Write ``data`` whole or not at all (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--models", nargs="+", default=None, help="substrings of model names to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed monitor run")
    parser.add_argument("--batches", type=int, default=4, help="batches per timed scan")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file (rewritten after every row)")
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="start no new row after this many seconds (a device lent for minutes still returns whole rows)",
    )  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled monitor rows")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the code paths, measures nothing")
    parser.add_argument(
        "--no-fused-relu", dest="fused_relu", action="store_false",
        help="count ReLU outputs with the separate statistics pass instead of the fused ReLU (for an A/B run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        parser.error(f"--budget-s must be a number of seconds >= 0, got {args.budget_s:g}")
    if not args.fused_relu:
        os.environ["DEADRELU_NO_FUSED_RELU"] = "1"  # read once, at the first ReLU deadrelu sees
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.repeats, args.steps, args.batches = 1, 2, 2
    elif not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here, nothing to measure (run with --cpu-smoke to exercise the code paths)")
        return 0
    else:
        device = torch.device("cuda")
    selected = [c for c in cases(tiny=args.cpu_smoke) if not args.models or any(m.lower() in c.name.lower() for m in args.models)]
    where = "CPU smoke run (tiny sizes; not benchmark numbers)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    print(f"deadrelu {deadrelu.__version__}, torch {torch.__version__}, {where}{'' if args.fused_relu else ', fused ReLU off'}")
    started = time.perf_counter()
    kernel_lines = kernel_numbers(device, args.repeats)
    print("\n".join(kernel_lines))
    meta = {"device": where, "torch": torch.__version__, "deadrelu": deadrelu.__version__, "smoke": args.cpu_smoke, "fused_relu": args.fused_relu, "kernel": kernel_lines}
    rows: list[Row] = []
    skipped: list[str] = []
    for case in selected:
        for dt in args.dtypes:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                skipped.append(f"{case.name} {dt}")
                continue
            rows.append(measure(case, dt, args, device))
            print(table(rows[-1:]).splitlines()[-1] if rows[:-1] else table(rows), flush=True)
            if args.json:  # after every row: a run cut short by a time limit keeps what it measured
                write_json(args.json, {**meta, "rows": [asdict(r) for r in rows], "skipped": skipped})
    print("\n" + table(rows))
    if skipped:
        print(f"not measured (--budget-s {args.budget_s:g} spent): {', '.join(skipped)}")
    if args.json:
        write_json(args.json, {**meta, "rows": [asdict(r) for r in rows], "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
