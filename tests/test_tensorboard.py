"""train.py --tensorboard=True: log.jsonl's records copied to TensorBoard (common.TensorBoard), the
numbers as scalars under kind/key at their step, the warnings as text; a clear error without the
tensorboard package."""
import builtins
import json
import os

import pytest

from common import RunLog, TensorBoard
from configurator import ConfigError
from helpers import TINY, run


class Writer:
    """Stands in for SummaryWriter: keeps what it is given."""
    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        pass


def test_each_number_is_a_scalar_at_its_step_and_each_warning_a_text(tmp_path):
    writer = Writer()
    log = RunLog(str(tmp_path), True, watchers=[TensorBoard(str(tmp_path), writer=writer)])
    log.record("train", "step 5", step=5, loss=2.5, lr=1e-3, update="done", overfit=False)
    log.record("eval", "eval", step=10, bleu=12.5, examples=[{"src": "a"}])
    log.warn("loss_spike", "the loss jumped", step=10)
    assert writer.scalars == [("train/loss", 2.5, 5), ("train/lr", 1e-3, 5), ("eval/bleu", 12.5, 10)]
    assert writer.texts == [("warning/loss_spike", "the loss jumped", 10)]


def test_without_the_package_the_run_is_refused_with_the_fix(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TensorBoard(str(tmp_path))


def test_a_run_writes_its_losses_where_tensorboard_reads_them(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    run("train.py", *TINY, "--max_iters=3", "--eval_interval=3", "--eval_sentences=5", "--tensorboard=True",
        f"--out_dir={out}")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    with open(out / "log.jsonl") as f:
        losses = [(r["step"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == losses
    assert [e.step for e in events.Scalars("eval/bleu")] == [3]
    assert os.path.isdir(out / "tensorboard")
