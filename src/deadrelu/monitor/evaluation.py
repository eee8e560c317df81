"""One evaluation of the monitor: a single host copy, the window report, history rows, lifecycle events, sink writes.

:class:`Evaluation` is the part of :class:`deadrelu.Monitor` that runs every ``log_every`` steps,
at a site's first full window and for ``report()`` and ``finish()``: it copies every site's
window state to the host at once (summed over ``torch.distributed`` ranks by site key first, see
:mod:`deadrelu.monitor.ranks`), builds the :class:`~deadrelu.Report`, adds a
:class:`~deadrelu.monitor.HistoryRow` per site, hands full windows to the unit lifecycle
(:mod:`deadrelu.monitor.unit_lifecycle`) and writes one :class:`~deadrelu.monitor.LogRecord` to
every sink, where a failing sink warns once.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from .blocks import BlockCapture
from .graph_capture import CompiledModelWarning, GraphCapture
from ..core.capture import ActivationCapture, display_names
from ..errors import DeadReluError, NoActivationSitesError
from ..core.report import Report, model_fingerprint, prime_unit_classes
from ..core.scan import site_report
from .ranks import SiteState, reduce_by_key
from .records import HistoryRow, LogRecord
from .sinks import Sink, SinkError, SinkWarning
from .unit_lifecycle import site_identity
from ..core.stats import UnitTotals

__all__ = ["Evaluation", "NEVER_ATTACHED"]

NEVER_ATTACHED = (
    "the monitor was never attached, so it has observed nothing: use `with deadrelu.Monitor(model, ...) as mon:` "
    "or `mon = deadrelu.Monitor(model, ...).attach()` before training"
)


def _host_values(states: Sequence[SiteState]) -> list[dict[str, torch.Tensor]]:
    """Every site's state tensors on the host, with one device-to-host copy for all of them.

    The tensors travel as one float64 vector (integer counts are exact below 2**53) and are
    split and cast back here."""
    tensors = [t for s in states for t in s.tensors.values()]
    if not tensors:
        return [{} for _ in states]
    device = tensors[0].device
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]).cpu()
    out, offset = [], 0
    for s in states:
        values: dict[str, torch.Tensor] = {}
        for k, t in s.tensors.items():
            chunk = flat[offset : offset + t.numel()]
            offset += t.numel()
            # counts become int64 again on the host (exact: integral float64 values below 2**53)
            values[k] = chunk if t.is_floating_point() else chunk.to(torch.int64)
        out.append(values)
    return out


class Evaluation:
    """The part of :class:`deadrelu.Monitor` that evaluates: reports, history, lifecycle hand-off and sink writes."""

    # -- evaluation -------------------------------------------------------------------------
    def _use_distributed(self) -> bool:
        if self.distributed is False:
            return False
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        if self.distributed and not ready:
            raise DeadReluError("distributed=True but torch.distributed has no initialised process group")
        return ready and dist.get_world_size() > 1

    def _reports(
        self, scopes: Sequence[str], raw: Sequence[str] = ()
    ) -> tuple[dict[str, Report], dict[str, int], dict[str, bool], dict[str, dict[str, torch.Tensor]]]:
        """Reports for the given scopes, each site's batch count in the last scope, whether its window
        is full, and each site's host sums of the ``raw`` scopes (``"{scope}.{statistic}"``: copied
        with the rest, made into no report).

        One host copy serves every site. Distributed, the ranks first agree on the union of
        their site keys and then sum one buffer laid out by key (:mod:`deadrelu.monitor.ranks`):
        a site one rank lacks counts as zeros there, and no two layers are ever added together.
        """
        states, samples = self._site_states((*raw, *scopes))
        if not states:
            if not self._ever_attached:
                raise NoActivationSitesError(NEVER_ATTACHED)
            hint = ""
            if self._op_asks_schedule:
                hint = (
                    "; with compiled=True only graphs that torch.compile's default (Inductor) backend compiles "
                    "after attach() are observed, not eager calls (call torch._dynamo.reset() to recompile)"
                )
            raise NoActivationSitesError(
                "the monitor has not observed an activation yet: run a training forward pass (with grad) "
                f"through {type(self.model).__name__} first{hint}"
            )
        values = _host_values(states)
        global_samples = dict(zip((*raw, *scopes), samples.tolist()))
        out: dict[str, Report] = {}
        for scope in scopes:
            sites = []
            for state, v in zip(states, values):
                obs = int(v[f"{scope}.observations"][0])
                fired, abs_sum, bad = v[f"{scope}.fired"], v[f"{scope}.abs_sum"], v[f"{scope}.nonfinite"]
                mean_abs = abs_sum / obs if obs else torch.zeros_like(abs_sum)
                totals = UnitTotals(obs, tuple(fired.tolist()), tuple(mean_abs.tolist()), tuple(bad.tolist()))
                site = site_report(state.name, state.view(), totals, self.levels)
                sites.append(prime_unit_classes(site, fired, mean_abs, bad))
            out[scope] = Report(
                sites=tuple(sites),
                levels=self.levels,
                batches=max([s.batches[scope] for s in states]),
                samples=int(global_samples[scope]),
                mode="train",
                model=type(self.model).__name__,
                fingerprint=model_fingerprint(self.model),
                uncaptured=tuple(f"{path} ({why})" for path, why in getattr(self.capture, "uncaptured", {}).items()),
            )
        last = scopes[-1]
        sums = {s.name: {k: t for k, t in v.items() if k.split(".", 1)[0] in raw} for s, v in zip(states, values)}
        return out, {s.name: s.batches[last] for s in states}, {s.name: s.full for s in states}, sums

    def _site_states(self, scopes: Sequence[str]) -> tuple[list[SiteState], torch.Tensor]:
        """This rank's per-site state tensors (summed over ranks by key when distributed) and sample counts."""
        named = self.capture.ordered_sites()
        local = []
        for name, site in named:
            info = site.info
            state = SiteState(
                (info.module, info.call, info.position, info.occurrence, info.function), name, info, site.unit_dim,
                site.stats.threshold,
                site.stats.units, full=bool(site.stats.full),
            )
            for scope in scopes:
                t = site.stats.totals(scope)
                state.batches[scope] = t.batches  # per rank: ranks step in lockstep, so the largest, not the sum
                for stat, tensor in t.state.items():  # every declared statistic, by name
                    state.tensors[f"{scope}.{stat}"] = tensor
            local.append(state)
        totals = {"window": sum(self._samples_ring), "total": self._samples_total, "first": 0}  # ("first" is read for unit states only)
        samples = torch.tensor([totals[sc] for sc in scopes], dtype=torch.int64)  # summed over ranks too
        if not self._use_distributed():
            return local, samples
        device = named[0][1].stats.device if named else self._collective_device()
        pooled = not isinstance(self.capture, (ActivationCapture, GraphCapture, BlockCapture))  # ModuleCapture: one per module
        namer = (lambda infos: [i.module or "<root>" for i in infos]) if pooled else display_names
        return reduce_by_key(local, samples.to(device), namer)

    def _collective_device(self) -> torch.device:
        """Where this rank's side of a collective lives when it has no site: NCCL needs the current GPU."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _evaluate(self) -> None:
        if self.attached:
            self._refuse_edited_model("while the monitor was attached")
        # Sites whose first full window is evaluated now: their born-dead units are read from the sums
        # of that window (kept when it filled), the window itself may have slid on since.
        ordered = self.capture.ordered_sites()
        pending = {name: site.stats for name, site in ordered if site.stats.full and site.stats not in self._filled}
        # (distributed, every rank sends the same scopes: whether a site's first window is pending is this rank's view)
        scopes = ("first", "window") if pending or self._use_distributed() else ("window",)
        try:
            reports, site_batches, full, sums = self._reports(scopes, raw=("total",))
        except NoActivationSitesError:
            if self._use_distributed():
                return  # no rank has seen an activation yet (all ranks agree: the union is empty)
            raise
        report = reports["window"]
        first = {s.name: s for s in reports["first"].sites if s.name in pending} if pending else {}
        # A site's display name can change mid-run (a second call position of its function
        # appears and both get ".k"): lifecycle state and warnings follow the site itself.
        identities = {name: site_identity(site.info) for name, site in ordered}
        self._forget_resized(report, identities)
        self._warn_pooled()
        for name, ident in identities.items():  # every name a site has had -> its current one
            self._name_ident[name] = ident
            self._ident_name[ident] = name
        self.history.aliases.update({name: self._ident_name[ident] for name, ident in self._name_ident.items()})
        step = self.steps
        self._last_eval_step = step
        self._units = {s.name: s.units for s in report.sites}
        loss = self._loss_value()
        rows, new_events = [], []
        for s in report.sites:
            n = s.units or 1
            rows.append(
                HistoryRow(
                    step=step,
                    site=s.name,
                    units=s.units,
                    batches=site_batches[s.name],
                    active=s.active / n,
                    asleep=s.asleep / n,
                    dead=s.dead / n,
                    dormant=s.dormant / n,
                    nonfinite=s.nonfinite / n,
                    loss=loss,
                    unobserved=s.unobserved / n,
                )
            )
            if full.get(s.name):
                new_events += self._site_lifecycle(step, s, identities.get(s.name, s.name), first.get(s.name), sums.get(s.name))
        for stats in pending.values():
            self._filled.add(stats)
        if any(full.values()):
            self._first_window_done = True
        self.history.rows.extend(rows)
        self.events.extend(new_events)
        record = LogRecord(step=step, loss=loss, rows=tuple(rows), events=tuple(new_events), report=report)
        for i, sink in enumerate(self.sinks):
            self._guard(i, sink, lambda sink=sink: sink.write(record))

    def _site_lifecycle(
        self, step: int, s: Any, ident: Any, first: Any | None, total: dict[str, torch.Tensor] | None
    ) -> list[Any]:
        """One full site's lifecycle events at this evaluation: its first full window's state first
        where that window is evaluated now, then the current window's, with the units that fired
        (finite values only) since the previous evaluation, or since the first window."""
        events = []
        base = self._fired_at_eval.get(ident)
        if first is not None:
            events += self._lifecycle(step, first, ident, warn=False)
            base = (torch.tensor(first.fired_counts, dtype=torch.int64), torch.tensor(first.nonfinite_counts, dtype=torch.int64))
        since = None
        if total is not None:
            fired, bad = total["total.fired"], total["total.nonfinite"]
            if base is not None and base[0].shape == fired.shape:
                since = (fired - base[0] > 0) & (bad - base[1] == 0)
            self._fired_at_eval[ident] = (fired, bad)
        return events + self._lifecycle(step, s, ident, fired_since=since)

    def _warn_pooled(self) -> None:
        """Compiled mode: a site recorded more often than there were observed forward passes is
        one graph run by several calls of a module (its own ``forward`` holds a graph break, so
        Dynamo compiled it as a frame of its own): nothing in the graph tells those calls apart,
        so their counts are pooled. Said once per site (the eager monitor keeps them apart)."""
        if type(self.capture) is not GraphCapture or not self._forwards or self._scoped:
            return
        for name, site in self.capture.ordered_sites():
            if site.stats.count > self._forwards and name not in self._pooled_warned:
                self._pooled_warned.add(name)
                warnings.warn(
                    f"deadrelu: compiled site {name!r} was recorded {site.stats.count} times in {self._forwards} "
                    "forward pass(es): it is a module called several times per forward whose own forward holds a "
                    "graph break, and compiled mode pools those calls into one site. For one site per call use the "
                    "eager monitor (compiled=False), or remove the graph break",
                    CompiledModelWarning,
                    stacklevel=4,
                )

    def _loss_value(self) -> float | None:
        loss = self._loss
        if loss is None:
            return None
        try:
            value = float(loss.float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        except (TypeError, ValueError):
            return None
        return value

    def _guard(self, index: int, sink: Sink, action: Callable[[], Any]) -> None:
        """Run a sink action; a failing sink warns once (or raises) and never stops the training run."""
        if index in self._broken:
            return
        try:
            action()
        except Exception as err:
            self._broken.add(index)
            name = getattr(sink, "name", type(sink).__name__)
            message = f"deadrelu: sink {name} failed ({type(err).__name__}: {err}); it is disabled for this run"
            if self.on_sink_error == "raise":
                raise SinkError(message) from err
            warnings.warn(message, SinkWarning, stacklevel=3)
