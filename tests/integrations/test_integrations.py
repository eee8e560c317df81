"""Lightning and Hugging Face integrations, each with a real tiny training run (skipped when absent)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from deadrelu import DeadReluError
from deadrelu.monitor.monitor import DeadUnitWarning
from fixtures.toolchain import needs_inductor


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def make_data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :1] * 2)


# -- Lightning ---------------------------------------------------------------------------------


def lightning_module(fail_at: int | None = None, self_call: bool = False):
    L = pytest.importorskip("lightning.pytorch")

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1))
            with torch.no_grad():
                self.net[0].bias[:3] = -100.0  # three units planted dead

        def training_step(self, batch, idx):
            if fail_at is not None and self.global_step == fail_at:
                raise RuntimeError("diverged")
            x, y = batch
            return nn.functional.mse_loss(self(x) if self_call else self.net(x), y)

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, idx):
            x, y = batch
            self.log("val", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return L, Tiny()


def lightning_trainer(L, tmp_path: Path, cb, **kw):
    from lightning.pytorch.loggers import CSVLogger

    kw.setdefault("max_steps", 8)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=cb if isinstance(cb, list) else [cb],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def test_lightning_callback_monitors_layers_made_in_configure_model(tmp_path: Path):
    """configure_model (lazy or sharded layers) runs after the setup hooks: the monitor is built after it."""
    from deadrelu.integrations import DeadReluCallback

    L = pytest.importorskip("lightning.pytorch")

    class Lazy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = None

        def configure_model(self):
            if self.net is None:
                self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1))
                with torch.no_grad():
                    self.net[0].bias[:3] = -100.0

        def training_step(self, batch, idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cb = DeadReluCallback(window=2, log_every=2)
    module = Lazy()
    trainer = lightning_trainer(L, tmp_path, cb, max_steps=4)
    trainer.fit(module, torch.utils.data.DataLoader(make_data(32), batch_size=8))
    report = cb.monitor.report()
    assert [(s.name, s.observations) for s in report.sites] == [("net.1", 16)]  # the window: 2 batches of 8
    assert report.sites[0].dead_units[:3] == (0, 1, 2)
    assert hooks_of(module) == 0


@pytest.mark.parametrize("self_call", [False, True], ids=["self.net(x)", "self(x)"])
def test_lightning_callback_logs_through_trainer_logger_and_detaches(tmp_path: Path, self_call: bool):
    L, module = lightning_module(self_call=self_call)
    from deadrelu.integrations import DeadReluCallback

    cb = DeadReluCallback(window=4, log_every=4, warn_at=(1.0,))
    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    trainer = lightning_trainer(L, tmp_path, cb, limit_val_batches=2, val_check_interval=4)
    trainer.fit(module, loader, loader)
    assert hooks_of(module) == 0 and not cb.monitor.attached
    mon = cb.monitor
    assert mon.steps == 8 and mon.history.steps == [4, 8]
    assert mon.report("total").batches == 8  # validation batches (inference mode) were not observed
    assert set(mon.report().site("net.1").dead_units) >= {0, 1, 2}
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [(int(r["step"]), float(r["deadrelu/net.1/dead"])) for r in rows if r.get("deadrelu/net.1/dead")]
    assert [s for s, _ in logged] == [4, 8]
    assert logged[0][1] == mon.history.series("net.1", "dead")[1][0]


def test_lightning_callback_detaches_on_exception(tmp_path: Path):
    L, module = lightning_module(fail_at=3)
    from deadrelu.integrations import DeadReluCallback

    cb = DeadReluCallback(window=2, log_every=1)
    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with pytest.raises(RuntimeError, match="diverged"):
            lightning_trainer(L, tmp_path, cb).fit(module, loader)
    assert hooks_of(module) == 0 and not cb.monitor.attached
    assert torch._C._len_torch_function_stack() == 0  # the observation scope was closed
    assert cb.monitor.steps == 3


@pytest.mark.parametrize("functional", [False, True], ids=["nn.ReLU", "F.gelu in training_step"])
def test_lightning_callback_with_gradient_accumulation_keeps_one_site_per_layer(tmp_path: Path, functional: bool):
    # Lightning reaches training_step by one code path on accumulation batches and another on
    # step batches: those frames must not split a layer into two half-observed sites (a
    # functional call in training_step's own code once split into two, one reporting every
    # unit dead).
    L = pytest.importorskip("lightning.pytorch")
    from deadrelu.integrations import DeadReluCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2))
            with torch.no_grad():
                self.net[0].weight.fill_(1.0)
                self.net[0].bias.zero_()  # every unit fires exactly on the positive inputs

        def training_step(self, batch, i):
            x, y = batch
            if functional:
                return nn.functional.cross_entropy(self.net[2](nn.functional.gelu(self.net[0](x))), y)
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x = torch.cat([torch.full((8, 1), 1.0 if k % 2 == 0 else -1.0) for k in range(8)])  # alternating batches
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=8)
    cb = DeadReluCallback(window=100, log_every=4, log_to_trainer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_trainer(L, tmp_path, cb, accumulate_grad_batches=2).fit(Net(), loader)
    sites = cb.monitor.report("total").sites
    # max_steps=8 optimizer steps of two batches each: two epochs of the 8 batches
    name = "<root>:gelu" if functional else "net.1"
    assert [(s.name, s.observations, s.dead) for s in sites] == [(name, 128, 0)]
    assert list(sites[0].fired_counts) == [64] * 4


def test_lightning_resume_from_a_checkpoint_goes_on_with_the_monitors_lifecycle(tmp_path: Path):
    # Without the callback's state, a resumed fit re-reported the planted units as born dead
    # at its first window and warned again.
    L, module = lightning_module()
    from deadrelu.integrations import DeadReluCallback

    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    first = DeadReluCallback(window=4, log_every=4, warn_at=(0.2,), log_to_trainer=False)
    with pytest.warns(DeadUnitWarning):
        trainer = lightning_trainer(L, tmp_path, first)
        trainer.fit(module, loader)
    assert first.monitor.events_summary().born_dead == 3
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    L, module = lightning_module()
    resumed = DeadReluCallback(window=4, log_every=4, warn_at=(0.2,), log_to_trainer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadUnitWarning)  # the warning was given before the checkpoint
        lightning_trainer(L, tmp_path, resumed, max_steps=16).fit(module, loader, ckpt_path=ckpt)
    mon = resumed.monitor
    assert mon.steps == 16 and mon.history.steps == [4, 8, 12, 16]
    assert [(e.step, e.kind) for e in mon.events] == [(4, "born_dead")] * 3
    assert [s.dead_now for s in mon.events_summary().sites] == [3] and len(mon.alerts) == 1


def test_two_lightning_callbacks_in_one_trainer_each_resume_their_own_monitor(tmp_path: Path):
    # Both had the state key "DeadReluCallback": Lightning refused the Trainer at once.
    L, module = lightning_module()
    from deadrelu.integrations import DeadReluCallback

    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)

    def pair():
        return [DeadReluCallback(window=w, log_every=w, warn_at=(1.0,), log_to_trainer=False) for w in (2, 4)]

    first = pair()
    trainer = lightning_trainer(L, tmp_path, first, max_steps=8)
    trainer.fit(module, loader)
    assert [cb.monitor.history.steps for cb in first] == [[2, 4, 6, 8], [4, 8]]
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)

    L, module = lightning_module()
    resumed = pair()
    lightning_trainer(L, tmp_path, resumed, max_steps=12).fit(module, loader, ckpt_path=ckpt)
    assert [cb.monitor.history.steps for cb in resumed] == [[2, 4, 6, 8, 10, 12], [4, 8, 12]]
    assert [[e.kind for e in cb.monitor.events] for cb in resumed] == [["born_dead"] * 3] * 2  # not born again


def test_a_lightning_checkpoint_keyed_by_the_class_name_still_resumes(tmp_path: Path):
    L, module = lightning_module()
    from deadrelu.integrations import DeadReluCallback

    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    first = DeadReluCallback(window=4, log_every=4, warn_at=(1.0,), log_to_trainer=False)
    trainer = lightning_trainer(L, tmp_path, first)
    trainer.fit(module, loader)
    ckpt = tmp_path / "old.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    saved["callbacks"] = {"DeadReluCallback": saved["callbacks"].pop(first.state_key)}  # as earlier releases saved it
    torch.save(saved, ckpt)

    L, module = lightning_module()
    resumed = DeadReluCallback(window=4, log_every=4, warn_at=(1.0,), log_to_trainer=False)
    lightning_trainer(L, tmp_path, resumed, max_steps=16).fit(module, loader, ckpt_path=ckpt)
    assert resumed.monitor.history.steps == [4, 8, 12, 16]
    assert [(e.step, e.kind) for e in resumed.monitor.events] == [(4, "born_dead")] * 3


def test_a_lightning_run_resumed_with_other_options_goes_on_from_the_checkpoints_one_state(tmp_path: Path):
    # The state key holds the options: a resumed run with another log_every found no state of its key
    # and started afresh, its dead units born dead again.
    L, module = lightning_module()
    from deadrelu.integrations import DeadReluCallback

    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    first = DeadReluCallback(window=4, log_every=4, warn_at=(1.0,), log_to_trainer=False)
    trainer = lightning_trainer(L, tmp_path, first)
    trainer.fit(module, loader)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)

    L, module = lightning_module()
    resumed = DeadReluCallback(window=2, log_every=2, warn_at=(1.0,), log_to_trainer=False)
    assert resumed.state_key != first.state_key
    with pytest.warns(UserWarning, match="was saved by a callback with other options: the monitor goes on from it"):
        lightning_trainer(L, tmp_path, resumed, max_steps=16).fit(module, loader, ckpt_path=ckpt)
    assert resumed.monitor.history.steps[: len(first.monitor.history.steps)] == first.monitor.history.steps
    assert resumed.monitor.events[: len(first.monitor.events)] == first.monitor.events
    born = [e for e in resumed.monitor.events if e.kind == "born_dead"]
    assert born == [e for e in first.monitor.events if e.kind == "born_dead"] and born  # not born again

    saved = torch.load(ckpt, weights_only=False)
    key = first.state_key
    saved["callbacks"][key.replace("'window': 4", "'window': 3")] = saved["callbacks"][key]
    torch.save(saved, ckpt)  # two states of other callbacks: whose is whose cannot be told
    L, module = lightning_module()
    afresh = DeadReluCallback(window=8, log_every=8, warn_at=(1.0,), log_to_trainer=False)
    with pytest.warns(UserWarning, match="holds 2 monitor states of callbacks with other options"):
        lightning_trainer(L, tmp_path, afresh, max_steps=16).fit(module, loader, ckpt_path=ckpt)
    assert afresh.monitor.events[: len(first.monitor.events)] != first.monitor.events  # its own lifecycle
    assert first.monitor.history.steps[0] not in afresh.monitor.history.steps


def test_lightning_manual_optimization_observes_the_forwards_after_each_backward(tmp_path: Path):
    # The scope closed at the first backward and never reopened: a second network trained in
    # the same training_step (a GAN's discriminator) had no site at all.
    L = pytest.importorskip("lightning.pytorch")
    from deadrelu.integrations import DeadReluCallback

    outputs: dict[str, list[torch.Tensor]] = {"g.1": [], "d.1": []}

    class TwoNets(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.g = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1))
            self.d = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, idx):
            x, y = batch
            for name, opt in zip(("g", "d"), self.optimizers()):
                h = getattr(self, name)[:2](x)
                outputs[f"{name}.1"].append(h.detach())
                loss = nn.functional.mse_loss(getattr(self, name)[2](h), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

        def validation_step(self, batch, idx):
            self.g(batch[0]), self.d(batch[0])

        def configure_optimizers(self):
            return [torch.optim.SGD(self.g.parameters(), lr=0.01), torch.optim.SGD(self.d.parameters(), lr=0.01)]

    cb = DeadReluCallback(window=100, log_every=2, log_to_trainer=False)
    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_trainer(L, tmp_path, cb, max_steps=6, limit_val_batches=1, val_check_interval=2).fit(TwoNets(), loader, loader)
    report = cb.monitor.report("total")
    assert [s.name for s in report.sites] == ["g.1", "d.1"]
    for site in report.sites:  # 3 batches (two optimizer steps each), validation left out
        h = torch.cat(outputs[site.name])
        assert site.observations == h.shape[0] == 24
        assert list(site.fired_counts) == (h > 0).sum(0).tolist()
    assert report.samples == 48  # each network's forward of the 8-row batch, as two forwards


# -- Hugging Face transformers --------------------------------------------------------------------


class HFTiny(nn.Module):
    """A plain module the HF Trainer can train: takes ``x`` and ``labels``, returns a dict with the loss."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1))
        with torch.no_grad():
            self.net[2].bias[:4] = -100.0  # four ReLU units planted dead
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("diverged")
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class DictData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = make_data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "labels": y}


def hf_trainer(tmp_path: Path, model: nn.Module, steps: int = 8, logging_steps: int = 4, **extra):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=logging_steps,
        learning_rate=0.01,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        **{"save_strategy": "no", **extra},
    )
    return tf.Trainer(model=model, args=args, train_dataset=DictData())


def test_transformers_callback_logs_into_trainer_history(tmp_path: Path):
    model = HFTiny()
    trainer = hf_trainer(tmp_path, model)
    from deadrelu.integrations import DeadReluTrainerCallback

    cb = DeadReluTrainerCallback(window=4, log_every=4, warn_at=(1.0,)).add_to(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    seen_by_later_callbacks = []

    class Spy(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen_by_later_callbacks.append(dict(logs or {}))

    trainer.add_callback(Spy())
    trainer.train()
    assert hooks_of(model) == 0 and not cb.monitor.attached
    mon = cb.monitor
    assert mon.steps == 8 and mon.history.steps == [4, 8]
    assert set(mon.report().site("net.3").dead_units) >= {0, 1, 2, 3}
    assert [s.name for s in mon.report().sites] == ["net.1", "net.3"]  # GELU captured too
    logged = [h for h in trainer.state.log_history if "deadrelu/net.3/dead" in h]
    assert [h["step"] for h in logged] == [4, 8]
    assert logged[0]["deadrelu/net.3/dead"] == mon.history.series("net.3", "dead")[1][0]
    assert any("deadrelu/net.3/dead" in logs for logs in seen_by_later_callbacks)


def test_transformers_resume_from_checkpoint_goes_on_with_the_monitors_lifecycle(tmp_path: Path):
    pytest.importorskip("transformers")  # the callback needs it before the trainer is made
    from deadrelu.integrations import DeadReluTrainerCallback
    from deadrelu.integrations.transformers import STATE_FILE

    def run(steps: int, **extra) -> DeadReluTrainerCallback:
        trainer = hf_trainer(tmp_path, HFTiny(), steps=steps, save_strategy="steps", save_steps=8)
        cb = DeadReluTrainerCallback(window=4, log_every=4, warn_at=(0.2,)).add_to(trainer)
        with cb:
            trainer.train(**extra)
        return cb

    with pytest.warns(DeadUnitWarning):
        first = run(8)
    state_file = first.state_file
    assert (tmp_path / "checkpoint-8" / state_file).is_file() and not (tmp_path / "checkpoint-8" / STATE_FILE).exists()
    born = [(e.step, e.site, e.unit) for e in first.monitor.events if e.kind == "born_dead"]
    assert {(4, "net.3", u) for u in range(4)} <= set(born)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadUnitWarning)  # given before the checkpoint, not again
        resumed = run(16, resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    mon = resumed.monitor
    assert mon.steps == 16 and mon.history.steps == [4, 8, 12, 16]
    assert mon.events[: len(first.monitor.events)] == first.monitor.events  # the run so far, kept
    assert [(e.step, e.site, e.unit) for e in mon.events if e.kind == "born_dead"] == born  # none again
    assert mon.alerts == first.monitor.alerts

    (tmp_path / "checkpoint-16" / state_file).write_text('{"format": "deadrelu.Monitor", "version": 1}')
    with pytest.raises(DeadReluError, match="checkpoint-16.*lacks the entry"):
        run(20, resume_from_checkpoint=str(tmp_path / "checkpoint-16"))
    (tmp_path / "checkpoint-16" / state_file).unlink()
    with pytest.warns(UserWarning, match=f"checkpoint-16/{state_file} does not exist: the monitor starts afresh"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeadUnitWarning)
            run(20, resume_from_checkpoint=str(tmp_path / "checkpoint-16"))


def test_a_transformers_run_resumed_with_other_options_goes_on_from_the_checkpoints_one_state(tmp_path: Path):
    # The state file is named by the options: a resumed run with another log_every found no file of
    # its name and started afresh, its dead units born dead again.
    pytest.importorskip("transformers")  # the callback needs it before the trainer is made
    from deadrelu.integrations import DeadReluTrainerCallback

    def run(steps: int, windows: tuple[int, ...], **extra) -> list[DeadReluTrainerCallback]:
        trainer = hf_trainer(tmp_path, HFTiny(), steps=steps, save_strategy="steps", save_steps=8)
        cbs = [DeadReluTrainerCallback(window=w, log_every=w, warn_at=(1.0,), log_to_trainer=False) for w in windows]
        for cb in reversed(cbs):
            cb.add_to(trainer)
        trainer.train(**extra)
        return cbs

    (first,) = run(8, (4,))
    folder = tmp_path / "checkpoint-8"
    with pytest.warns(UserWarning, match=rf"{first.state_file}, was saved by a callback with other options: the monitor goes on"):
        (resumed,) = run(16, (2,), resume_from_checkpoint=str(folder))
    assert resumed.state_file != first.state_file
    assert resumed.monitor.events[: len(first.monitor.events)] == first.monitor.events
    born = [e for e in resumed.monitor.events if e.kind == "born_dead"]
    assert born == [e for e in first.monitor.events if e.kind == "born_dead"] and born  # not born again
    assert resumed.monitor.history.steps == [4, 8, 10, 12, 14, 16]  # the saved history, then every 2nd step

    run(8, (2, 4))  # checkpoint-8 now holds two states: whose is whose cannot be told for a third callback
    with pytest.warns(UserWarning, match=r"does not exist \(it holds 2 of other callbacks: .*\): the monitor starts afresh"):
        (afresh,) = run(16, (8,), resume_from_checkpoint=str(folder))
    assert afresh.monitor.history.steps == [8]  # its own 8 steps since the resume: no saved history


def test_two_transformers_callbacks_in_one_trainer_each_resume_their_own_monitor(tmp_path: Path):
    # Both saved checkpoint-N/deadrelu_monitor.json: the second overwrote the first, and at resume
    # both read the second's state.
    pytest.importorskip("transformers")  # the callback needs it before the trainer is made
    from deadrelu.integrations import DeadReluTrainerCallback

    def run(steps: int, **extra) -> list[DeadReluTrainerCallback]:
        trainer = hf_trainer(tmp_path, HFTiny(), steps=steps, save_strategy="steps", save_steps=8)
        pair = [DeadReluTrainerCallback(window=w, log_every=w, warn_at=(1.0,), log_to_trainer=False) for w in (2, 4)]
        for cb in reversed(pair):
            cb.add_to(trainer)
        trainer.train(**extra)
        return pair

    first = run(8)
    assert [cb.monitor.history.steps for cb in first] == [[2, 4, 6, 8], [4, 8]]
    names = [cb.state_file for cb in first]
    assert len(set(names)) == 2 and all((tmp_path / "checkpoint-8" / n).is_file() for n in names)
    resumed = run(16, resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert [cb.monitor.history.steps for cb in resumed] == [[2, 4, 6, 8, 10, 12, 14, 16], [4, 8, 12, 16]]
    for was, now in zip(first, resumed):  # each goes on with its own lifecycle: the run so far kept, none born again
        assert now.monitor.events[: len(was.monitor.events)] == was.monitor.events
        assert [e for e in now.monitor.events if e.kind == "born_dead"] == [e for e in was.monitor.events if e.kind == "born_dead"]


def test_a_transformers_checkpoint_with_the_old_state_file_name_still_resumes(tmp_path: Path):
    pytest.importorskip("transformers")  # the callback needs it before the trainer is made
    from deadrelu.integrations import DeadReluTrainerCallback
    from deadrelu.integrations.transformers import STATE_FILE

    def run(steps: int, **extra) -> DeadReluTrainerCallback:
        trainer = hf_trainer(tmp_path, HFTiny(), steps=steps, save_strategy="steps", save_steps=8)
        cb = DeadReluTrainerCallback(window=4, log_every=4, warn_at=(1.0,), log_to_trainer=False).add_to(trainer)
        trainer.train(**extra)
        return cb

    first = run(8)
    folder = tmp_path / "checkpoint-8"
    (folder / first.state_file).rename(folder / STATE_FILE)  # as earlier releases saved it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "starts afresh"
        resumed = run(16, resume_from_checkpoint=str(folder))
    assert resumed.monitor.history.steps == [4, 8, 12, 16]
    assert resumed.monitor.events[: len(first.monitor.events)] == first.monitor.events
    born = [e for e in resumed.monitor.events if e.kind == "born_dead"]
    assert born == [e for e in first.monitor.events if e.kind == "born_dead"] and len(born) >= 4  # not born again


def test_two_transformers_callbacks_with_the_same_options_are_refused_with_no_hook_left(tmp_path: Path):
    pytest.importorskip("transformers")  # the callback needs it before the trainer is made
    from deadrelu.integrations import DeadReluTrainerCallback

    model = HFTiny()
    trainer = hf_trainer(tmp_path, model, save_strategy="steps", save_steps=4)
    twins = [DeadReluTrainerCallback(window=4, every=lambda step: step % 2 == 0) for _ in range(2)]
    for cb in twins:
        trainer.add_callback(cb)
    name = twins[0].state_file
    with pytest.raises(
        DeadReluError,
        match=r"^two DeadReluTrainerCallbacks in one Trainer have the same options \(functions count by name, other "
        rf"objects by type\), so both would save their monitor's state to checkpoint-N/{name} and each resume the "
        r"other's: give one other options",
    ):
        trainer.train()
    assert hooks_of(model) == 0 and model.calls == 0
    assert not any(p.name.startswith("checkpoint-") for p in tmp_path.iterdir())
    # a callback with other options runs beside it
    trainer = hf_trainer(tmp_path, model, steps=4)
    pair = [DeadReluTrainerCallback(window=4, warn_at=(1.0,)), DeadReluTrainerCallback(window=2, warn_at=(1.0,))]
    for cb in pair:
        trainer.add_callback(cb)
    trainer.train()
    assert [cb.monitor.steps for cb in pair] == [4, 4] and hooks_of(model) == 0


def test_transformers_callback_reused_for_a_second_run_logs_only_that_runs_numbers(tmp_path: Path):
    pytest.importorskip("transformers")  # the callback needs it before the trainer is made
    # The final evaluation (at train end, after the trainer's last log) must not be logged at the
    # next run's first step.
    from deadrelu.integrations import DeadReluTrainerCallback

    cb = DeadReluTrainerCallback(window=2, log_every=100, warn_at=(1.0,))
    alive, dead = HFTiny(), HFTiny()
    with torch.no_grad():
        alive.net[2].bias.fill_(100.0)
        dead.net[2].bias.fill_(-100.0)
    first = hf_trainer(tmp_path / "1", alive, steps=3, logging_steps=1)
    cb.add_to(first)
    first.train()
    second = hf_trainer(tmp_path / "2", dead, steps=1, logging_steps=1)
    cb.add_to(second)
    second.train()
    logged = [h["deadrelu/net.3/dead"] for h in second.state.log_history if "deadrelu/net.3/dead" in h]
    assert logged and all(v == 1.0 for v in logged), logged


def test_transformers_callback_as_context_manager_detaches_on_failure(tmp_path: Path):
    model = HFTiny(fail_at=3)
    trainer = hf_trainer(tmp_path, model)
    from deadrelu.integrations import DeadReluTrainerCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        with pytest.raises(RuntimeError, match="diverged"):
            with DeadReluTrainerCallback(window=2, log_every=1) as cb:
                trainer.add_callback(cb)
                trainer.train()
    assert hooks_of(model) == 0 and not cb.monitor.attached
    assert cb.monitor.steps == 3


def fails_to_close():
    """A sink whose close() fails."""
    from deadrelu.monitor.sinks import Sink

    class FailsToClose(Sink):
        name = "fails-to-close"

        def write(self, record) -> None:
            pass

        def close(self) -> None:
            raise OSError("disk gone")

    return FailsToClose()


def test_a_sink_failing_to_close_does_not_replace_the_training_error(tmp_path: Path):
    # With on_sink_error="raise" both integrations raised the SinkError of closing instead.
    from deadrelu.monitor.sinks import SinkWarning

    L, module = lightning_module(fail_at=3)
    from deadrelu.integrations import DeadReluCallback, DeadReluTrainerCallback

    cb = DeadReluCallback(window=2, log_every=1, warn_at=(1.0,), sinks=[fails_to_close()], on_sink_error="raise")
    loader = torch.utils.data.DataLoader(make_data(), batch_size=8)
    with pytest.warns(SinkWarning, match="disk gone"), pytest.raises(RuntimeError, match="diverged"):
        lightning_trainer(L, tmp_path, cb).fit(module, loader)
    assert hooks_of(module) == 0 and not cb.monitor.attached

    model = HFTiny(fail_at=3)
    trainer = hf_trainer(tmp_path / "hf", model)
    with pytest.warns(SinkWarning, match="disk gone"), pytest.raises(RuntimeError, match="diverged"):
        with DeadReluTrainerCallback(window=2, log_every=1, warn_at=(1.0,), sinks=[fails_to_close()], on_sink_error="raise") as hf:
            trainer.add_callback(hf)
            trainer.train()
    assert hooks_of(model) == 0 and not hf.monitor.attached


def test_integrations_name_unknown_attribute():
    import deadrelu.integrations as integ

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        integ.Nope  # noqa: B018


def test_trainer_state_json_serialisable(tmp_path: Path):
    model = HFTiny()
    trainer = hf_trainer(tmp_path, model, steps=4)
    from deadrelu.integrations import DeadReluTrainerCallback

    DeadReluTrainerCallback(window=2, log_every=2, warn_at=(1.0,)).add_to(trainer)
    trainer.train()
    json.dumps(trainer.state.log_history)


@needs_inductor
def test_transformers_callback_with_torch_compile_observes_the_compiled_graphs(tmp_path: Path):
    tf = pytest.importorskip("transformers")
    from deadrelu.monitor.graph_capture import graph_capture_available

    if not graph_capture_available():
        pytest.skip("needs effectful custom ops")
    torch._dynamo.reset()
    model = HFTiny()
    trainer = hf_trainer(tmp_path, model, torch_compile=True)  # compiled by the Trainer, after callbacks attach
    from deadrelu.integrations import DeadReluTrainerCallback

    cb = DeadReluTrainerCallback(window=4, log_every=4, warn_at=(1.0,)).add_to(trainer)
    trainer.train()
    mon = cb.monitor
    assert mon.compiled and type(mon.capture).__name__ == "GraphCapture"
    assert mon.history.steps == [4, 8]
    assert [s.name for s in mon.report().sites] == ["net.1", "net.3"]
    assert set(mon.report().site("net.3").dead_units) >= {0, 1, 2, 3}
    torch._dynamo.reset()
    del tf


@needs_inductor
def test_lightning_callback_with_a_compiled_submodule(tmp_path: Path):
    from deadrelu.monitor.graph_capture import graph_capture_available

    if not graph_capture_available():
        pytest.skip("needs effectful custom ops")
    torch._dynamo.reset()
    L, module = lightning_module()
    module.net = torch.compile(module.net)
    from deadrelu.integrations import DeadReluCallback

    cb = DeadReluCallback(window=4, log_every=4, compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadUnitWarning)
        lightning_trainer(L, tmp_path, cb).fit(module, torch.utils.data.DataLoader(make_data(), batch_size=8))
    mon = cb.monitor
    assert type(mon.capture).__name__ == "BlockCapture" and mon.history.steps == [4, 8]
    (site,) = mon.report("total").sites
    assert (site.name, site.observations, site.dead_units) == ("net.1", 64, (0, 1, 2))
    torch._dynamo.reset()
