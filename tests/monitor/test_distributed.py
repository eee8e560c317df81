"""Distributed: two gloo ranks on CPU, each seeing half of every batch, report what one process sees."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import deadrelu
from deadrelu.monitor.monitor import DeadUnitWarning
from fixtures.toolchain import needs_inductor

WORLD = 2
STEPS = 5
WINDOW = 3


def build() -> tuple[nn.Module, list[torch.Tensor]]:
    """The same model and batches in every process (fixed seeds); some units planted dead."""
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias[:4] = -50.0
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(12, 5, generator=g) for _ in range(STEPS)]
    return model, batches


def run(model: nn.Module, batches: list[torch.Tensor], rank: int | None) -> dict:
    """Forward+backward every batch (this rank's half, or all of it); return reports and history."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with deadrelu.Monitor(model, window=WINDOW, log_every=2) as mon:
            for x in batches:
                part = x if rank is None else x.chunk(WORLD)[rank]
                model(part).sum().backward()  # no optimizer step: the weights stay identical everywhere
                mon.step()
            window, total = mon.report("window"), mon.report("total")
    return {
        "window": window.to_dict(),
        "total": total.to_dict(),
        "history": mon.history.to_dicts(),
        "events": [(e.step, e.site, e.unit, e.kind) for e in mon.events],
    }


@contextlib.contextmanager
def process_group(rank: int, port: int) -> Iterator[None]:
    """Join this test's two-rank gloo group on localhost for the block (left afterwards, even on failure)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model, batches = build()
        result = run(model, batches, rank)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comparable(report: dict) -> list[tuple]:
    return [(s["name"], s["observations"], s["fired_counts"], s["nonfinite_counts"]) for s in report["sites"]]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_equal_one_process(tmp_path: Path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(WORLD)]
    model, batches = build()
    single = run(model, batches, None)
    for res in ranks:
        for scope in ("window", "total"):
            assert comparable(res[scope]) == comparable(single[scope])
            for a, b in zip(res[scope]["sites"], single[scope]["sites"]):
                assert a["mean_abs"] == pytest.approx(b["mean_abs"], rel=1e-5)
        assert [(h["step"], h["site"], h["dead"], h["asleep"], h["batches"]) for h in res["history"]] == [
            (h["step"], h["site"], h["dead"], h["asleep"], h["batches"]) for h in single["history"]
        ]
        assert res["events"] == [list(e) for e in single["events"]]
    # the planted units are dead globally; each rank alone saw only half the rows
    assert set(range(4)) <= set(ranks[0]["window"]["sites"][0]["summary"]["dead_units"])
    assert ranks[0]["window"]["sites"][0]["observations"] == 12 * WINDOW
    assert ranks[0]["window"]["samples"] == single["window"]["samples"] == 12 * WINDOW
    assert ranks[1]["total"]["samples"] == single["total"]["samples"] == 12 * STEPS


def test_distributed_true_without_process_group_is_an_error():
    model, _ = build()
    mon = deadrelu.Monitor(model, distributed=True, window=1)
    with pytest.raises(deadrelu.DeadReluError, match="no initialised process group"):
        mon.attach()
    assert not mon.attached
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


# -- ranks that meet different layers, in different orders -------------------------------------------

BRANCH_STEPS = 6
BRANCH_WINDOW = 3
# Per rank and step, the branches run, in order: rank 0 runs a then b (and skips b at step 2,
# as LayerDrop would); rank 1 runs b, then a, then c, a branch rank 0 never runs.
ORDERS = {
    0: [("a", "b"), ("a", "b"), ("a",), ("a", "b"), ("a", "b"), ("a", "b")],
    1: [("b", "a", "c")] * BRANCH_STEPS,
}
DEAD = {"a": [0, 1, 2, 3], "b": [1], "c": [2]}


class Branches(nn.Module):
    """Three independent Linear+ReLU branches run in the order given to forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
        self.c = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
        with torch.no_grad():
            for name, units in DEAD.items():
                getattr(self, name)[0].bias[units] = -50.0

    def forward(self, x: torch.Tensor, order: tuple[str, ...]) -> torch.Tensor:
        return sum(getattr(self, name)(x).sum() for name in order)


def branch_batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4 + rank, 5, generator=g) for _ in range(BRANCH_STEPS)]  # ranks' batch sizes differ too


def branch_worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model = Branches()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeadUnitWarning)
            with deadrelu.Monitor(model, window=BRANCH_WINDOW, log_every=2) as mon:
                for x, order in zip(branch_batches(rank), ORDERS[rank]):
                    model(x, order).backward()
                    mon.step()
                window, total = mon.report("window"), mon.report("total")
        result = {
            "window": window.to_dict(),
            "total": total.to_dict(),
            "history": mon.history.to_dicts(),
            "summary": [(s.site, s.units) for s in mon.events_summary().sites],
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def brute_force() -> dict[str, dict[str, dict[str, list]]]:
    """Per scope and site: fired counts, observations and |h| sums over both ranks' data, from the
    full activation tensors (forward hooks), each rank's window being its last BRANCH_WINDOW batches of that site."""
    per_rank: dict[int, dict[str, list[torch.Tensor]]] = {}
    for rank in range(WORLD):
        model = Branches()
        seen: dict[str, list[torch.Tensor]] = {}
        for name in "abc":
            getattr(model, name)[1].register_forward_hook(
                lambda m, args, out, name=name: seen.setdefault(f"{name}.1", []).append(out.detach().clone())
            )
        with torch.no_grad():
            for x, order in zip(branch_batches(rank), ORDERS[rank]):
                model(x, order)
        per_rank[rank] = seen
    out: dict[str, dict[str, dict[str, list]]] = {"window": {}, "total": {}}
    for scope in out:
        for site in ("a.1", "b.1", "c.1"):
            hs = [h for r in range(WORLD) for h in (per_rank[r].get(site, [])[-BRANCH_WINDOW:] if scope == "window" else per_rank[r].get(site, []))]
            h = torch.cat(hs)
            out[scope][site] = {
                "fired": (h > 0).sum(0).tolist(),
                "observations": h.shape[0],
                "mean_abs": (h.double().abs().sum(0) / h.shape[0]).tolist(),
            }
    return out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_with_different_orders_and_site_sets_reduce_by_site(tmp_path: Path):
    mp.spawn(branch_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(WORLD)]
    want = brute_force()
    for res in ranks:
        for scope in ("window", "total"):
            sites = {s["name"]: s for s in res[scope]["sites"]}
            assert list(sites) == ["a.1", "b.1", "c.1"]  # the union, in rank 0's order, then rank 1's new site
            for name, expected in want[scope].items():
                assert sites[name]["fired_counts"] == expected["fired"], (scope, name)
                assert sites[name]["observations"] == expected["observations"], (scope, name)
                assert sites[name]["mean_abs"] == pytest.approx(expected["mean_abs"], rel=1e-5)
                dead = sites[name]["summary"]["dead_units"]
                assert dead == [u for u, f in enumerate(expected["fired"]) if f == 0]
                assert set(DEAD[name[0]]) <= set(dead)  # the planted units, on every rank (the old flat buffer lost them)
        assert sorted(res["summary"]) == [["a.1", 8], ["b.1", 6], ["c.1", 4]]  # events_summary knows every rank's sites
    # every rank saw the same evaluations and the same union of sites
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["window"] == ranks[1]["window"] and ranks[0]["total"] == ranks[1]["total"]
    assert ranks[0]["total"]["samples"] == 4 * BRANCH_STEPS + 5 * BRANCH_STEPS


def test_union_order_and_width_mismatch_without_processes():
    """The pure part of the by-key reduction: one union order on every rank; a width clash is one clear error."""
    from deadrelu.monitor import ranks

    assert ranks.union_order([[("b",), ("a",)], [("a",), ("c",)]]) == [("b",), ("a",), ("c",)]

    def desc(units: int) -> tuple:
        return (("fc", 0, 0, "relu"), "fc", None, 1, 0.0, units, (("window.fired", units, False),), {"window": 1}, False)

    with pytest.raises(deadrelu.DeadReluError, match="'fc' has 4 units .* but 5 .* on rank 1"):
        ranks._merge_descriptions([[desc(4)], [desc(5)]])


# -- compiled models: the graph capture's sites reduce by key like the eager ones ---------------------


class Reused(nn.Module):
    """One ReLU module called twice: two sites that must keep their own names across ranks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.l1, self.l2, self.relu, self.out = nn.Linear(5, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)
        with torch.no_grad():
            self.l2.bias[:3] = -50.0

    def forward(self, x: torch.Tensor, calls: int = 2) -> torch.Tensor:
        h = self.relu(self.l1(x))
        if calls >= 2:
            h = self.relu(self.l2(h))
        if calls >= 3:
            h = self.relu(h - 1.0)
        return self.out(h).sum()


def run_compiled(rank: int | None, compiled: bool) -> dict:
    model = Reused()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 5, generator=g) for _ in range(STEPS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        mon = deadrelu.Monitor(model, window=WINDOW, log_every=2, compiled=compiled).attach()
        runner = torch.compile(model) if compiled else model
        for x in batches:
            # ranks call the module a different number of times (1 and 3): their own names disagree
            runner(x if rank is None else x.chunk(WORLD)[rank], calls=2 if rank is None else 1 + 2 * rank).backward()
            mon.step()
        total = mon.report("total").to_dict()
        mon.detach()
    return {"total": total}


def compiled_worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(run_compiled(rank, compiled=True)))


@needs_inductor
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_compiled_ranks_reduce_each_call_of_a_reused_module_by_its_own_key(tmp_path: Path):
    from deadrelu.monitor.graph_capture import graph_capture_available

    if not graph_capture_available():
        pytest.skip("needs effectful custom ops")
    mp.spawn(compiled_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(WORLD)]
    single = run_compiled(None, compiled=False)  # one eager process on the whole batches
    for res in ranks:  # one site per call, by key, named as one process would name them
        assert [s["name"] for s in res["total"]["sites"]] == ["relu#1", "relu#2", "relu#3"]
        assert [s["observations"] for s in res["total"]["sites"]] == [8 * STEPS, 4 * STEPS, 4 * STEPS]
        assert comparable(res["total"])[0] == comparable(single["total"])[0]  # the call both ranks made
    assert ranks[0]["total"]["sites"][1]["summary"]["dead_units"][:3] == [0, 1, 2]
