"""Threads and copies: hooks act only for the thread running the observed forward, replicas are
refused in one line, and copies or pickles of a watched model never feed the capture."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from fixtures.models import MLP, brute_force
from torch import nn

import deadrelu


def _mode_depth() -> int:
    return torch._C._len_torch_function_stack()


def test_monitor_training_thread_with_concurrent_eval_thread():
    torch.manual_seed(0)
    model = MLP()
    g = torch.Generator().manual_seed(0)
    train_batches = [torch.randn(16, 10, generator=g) for _ in range(60)]
    errors: list[BaseException] = []
    depths: list[int] = []
    stop = threading.Event()

    def evaluate():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    model(torch.randn(8, 10))
            depths.append(_mode_depth())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    with deadrelu.Monitor(model, window=len(train_batches), log_every=1000) as mon:
        evaluator = threading.Thread(target=evaluate)
        evaluator.start()

        def train():
            try:
                for x in train_batches:
                    model(x).sum().backward()
                    mon.step()
                depths.append(_mode_depth())
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        trainer = threading.Thread(target=train)
        trainer.start()
        trainer.join()
        stop.set()
        evaluator.join()
    assert errors == []
    assert depths == [0, 0] and _mode_depth() == 0  # no mode left active in any thread
    report = mon.report("total")
    assert [s.name for s in report.sites] == ["1", "3"]
    with torch.no_grad():
        acts = [model.activations(x) for x in train_batches]
    for k, site in enumerate(report.sites):  # every training forward counted, no eval forward
        truth = brute_force(torch.cat([a[k][1] for a in acts]), 1)
        assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])


def test_forward_in_another_thread_during_an_observed_one_is_ignored():
    model = MLP().eval()
    inside = threading.Event()
    release = threading.Event()

    class Gate(nn.Module):
        def forward(self, x):
            if threading.current_thread() is threading.main_thread():
                inside.set()
                release.wait(5)
            return x

    wrapped = nn.Sequential(Gate(), model)
    errors = []
    with deadrelu.Probe(wrapped) as probe:
        worker = threading.Thread(target=lambda: errors.append(None) if inside.wait(5) and wrapped(torch.randn(5, 10)) is not None and not release.set() else None)
        worker.start()
        wrapped(torch.randn(7, 10))
        worker.join()
    assert errors == [None]
    assert [s.observations for s in probe.report().sites] == [7, 7]


def test_data_parallel_style_replica_is_refused_in_one_line():
    model = MLP()
    replica = model._replicate_for_data_parallel()  # what nn.DataParallel runs in its threads
    with deadrelu.Probe(model):
        with pytest.raises(deadrelu.DeadReluError, match="DataParallel replicas"):
            replica(torch.randn(3, 10))
        model(torch.randn(3, 10))


def test_deepcopy_and_pickle_of_a_watched_model(tmp_path):
    model = MLP()
    x = torch.randn(12, 10)
    with deadrelu.Monitor(model, window=4, sinks=[str(tmp_path / "log.jsonl")]) as mon, deadrelu.Probe(model) as probe:
        model(x).sum().backward()
        mon.step()
        with torch.no_grad():
            ref = model(x)  # seen by the probe only (the monitor watches training passes)
        twin = copy.deepcopy(model)
        thawed = pickle.loads(pickle.dumps(model))
        for other in (twin, thawed):
            other(torch.randn(50, 10)).sum().backward()
            assert not other._forward_hooks and not other._forward_pre_hooks
            assert all(not m._forward_hooks and not m._forward_pre_hooks for m in other.modules())
            torch.testing.assert_close(other(x), ref)
        assert [s.observations for s in probe.report().sites] == [24, 24]  # x twice, never the copies
        assert [s.observations for s in mon.report("total").sites] == [12, 12]


def test_surgery_copies_inside_a_monitor_and_probe():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(64, 10)
    report = deadrelu.scan(model, x)
    with deadrelu.Monitor(model, window=2) as mon, deadrelu.Probe(model) as probe:
        model(x).sum().backward()
        mon.step()
        pruned = deadrelu.prune_dead(model, report, x).model
        swapped = deadrelu.swap_activations(model, "leaky_relu", copy=True).model
        for other in (pruned, swapped):
            with torch.no_grad():
                other(x)
        # A copy feeding the old capture would add leaky_relu sites or fail on 29 units of 32.
        sites = probe.report().sites
        assert [(s.name, s.function, s.units) for s in sites] == [("1", "relu", 32), ("3", "relu", 16)]
        assert sites[0].observations == 64 * probe.capture.forwards  # only the original's own passes
    pruned_report = deadrelu.scan(pruned, x)
    assert [s.units for s in pruned_report.sites] == [29, 14]
