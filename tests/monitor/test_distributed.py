"""Distributed: two gloo ranks on CPU, each seeing half of every batch, report what one process sees."""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import deadrelu
from deadrelu.monitor.monitor import DeadUnitWarning

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


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, batches = build()
        result = run(model, batches, rank)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


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
