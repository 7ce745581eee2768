"""`sgsd train --tensorboard` writes every optimizer step's metrics row (the same numbers as train.parquet)."""

from __future__ import annotations

import sys
import types

import polars as pl
import pytest

from test_train import make_run, train_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeWriter:
    made: list["FakeWriter"] = []

    def __init__(self, logdir):
        self.logdir, self.scalars, self.closed = logdir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, k, v, step):
        self.scalars.append((k, float(v), int(step)))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_train_logs_each_step_to_tensorboard(tmp_path, tiny, tiny_model_dir, monkeypatch):
    from stages import train

    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)
    FakeWriter.made.clear()
    run = make_run(tmp_path / "run", tiny)
    path = train.run(train_cfg(tiny_model_dir, steps=2, tensorboard=True), run)
    table = pl.read_parquet(path)
    (w,) = FakeWriter.made
    assert w.closed and w.logdir == str(run / "tensorboard")
    losses = [(v, s) for k, v, s in w.scalars if k == "loss"]
    assert losses == [(pytest.approx(r["loss"]), r["policy_step"]) for r in table.iter_rows(named=True)]


def test_missing_sink_package_is_one_log_line(tmp_path):
    from stages.engine.metrics_log import MetricSinks

    said = []
    monkeypatch_modules = {"torch.utils.tensorboard": None, "wandb": None}
    saved = {k: sys.modules.get(k) for k in monkeypatch_modules}
    try:
        sys.modules.update(monkeypatch_modules)  # None in sys.modules makes the import fail
        s = MetricSinks(True, "proj", tmp_path, {}, said.append)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert not s.active and len(said) == 2 and all("not installed" in x for x in said)
    s.write({"loss": 1.0}, 0)
    s.close()
