"""What happens to a run when things go wrong: kills, signals, a full disk, non-finite losses,
checkpoints that are corrupt, crafted or mismatched. docs/robustness.md's "When things go wrong" table
points here."""
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import ConfigError
from helpers import ROOT, TINY, run, train_records

TINY = [*TINY, "--eval_sentences=5", "--dropout=0.1",
        # constant learning rate: a run stopped early and resumed follows the same schedule
        "--warmup_frac=0", "--learning_rate=2e-3", "--min_lr=2e-3"]


def faulty(mode, n, *args):
    return run("tests/faulty_train.py", mode, str(n), *TINY, *args, check=False)


def losses(out_dir):
    records = train_records(out_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 12-step run: the trajectory every interrupted run must reproduce."""
    out_dir = tmp_path_factory.mktemp("straight")
    run("train.py", *TINY, "--max_iters=12", "--eval_interval=4", f"--out_dir={out_dir}")
    return out_dir


@pytest.mark.slow      # ~20 s: four training processes, three of them killed
def test_sigkill_in_a_step_in_evaluation_and_in_a_checkpoint_write_loses_nothing(straight, tmp_path):
    common = ["--max_iters=12", "--eval_interval=4", f"--out_dir={tmp_path}"]
    ckpt = str(tmp_path / "ckpt.pt")
    killed = faulty("kill_step", 6, *common)                      # during step 6; last checkpoint: step 4
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(ckpt)["step"] == 4
    killed = faulty("kill_eval", 1, *common, "--init_from=resume")   # resumed at 4, killed evaluating step 8
    assert killed.returncode == -signal.SIGKILL and load_checkpoint(ckpt)["step"] == 4
    killed = faulty("kill_save", 1, *common, "--init_from=resume")   # killed writing step 8's checkpoint
    assert killed.returncode == -signal.SIGKILL
    assert os.path.exists(ckpt + ".tmp") and load_checkpoint(ckpt)["step"] == 4   # the half file is not it
    run("train.py", *common, "--init_from=resume")
    expected, got = losses(straight), losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    assert got == expected                                        # bit-identical, dropout included


def stop_with(sig: signal.Signals, straight, out_dir) -> None:
    """Send `sig` to a training run once it is under way: it finishes the step in flight, saves,
    exits with code 0 saying how to go on, and resumes onto the uninterrupted run's losses."""
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--max_iters=12", "--eval_interval=4",
                             f"--out_dir={out_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:                                      # wait until training is under way
        if line.startswith("step      5"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"received {sig.name}" in out and "continue with --init_from=resume" in out and "Traceback" not in err
    stopped_at = load_checkpoint(str(out_dir / "ckpt.pt"))["step"]
    assert 5 <= stopped_at < 12                                   # the step in flight was finished and saved
    run("train.py", *TINY, "--max_iters=12", f"--out_dir={out_dir}", "--init_from=resume")
    assert losses(out_dir) == losses(straight)


@pytest.mark.slow      # ~8 s; the SIGINT/SIGTERM handler shares its save-and-stop path with max_bad_steps
def test_sigterm_saves_and_exits_cleanly_then_resumes(straight, tmp_path):
    stop_with(signal.SIGTERM, straight, tmp_path)


@pytest.mark.slow      # ~8 s, as SIGTERM's
def test_ctrl_c_saves_and_exits_like_sigterm_then_resumes(straight, tmp_path):
    stop_with(signal.SIGINT, straight, tmp_path)


@pytest.mark.slow      # ~5 s; test_save_checkpoint_never_leaves_a_partial_file checks the same in-process
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    out = faulty("disk_full", 2, "--max_iters=8", "--eval_interval=4", f"--out_dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "No space left on device" in out.stderr and "previous checkpoint is untouched" in out.stderr
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4       # the one before the failed write
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")


def test_unwritable_out_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = run("train.py", *TINY, "--max_iters=2", f"--out_dir={blocker / 'run'}", check=False)
    assert out.returncode == 2 and "cannot create out_dir" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow      # ~6 s; the next test sees skipped steps too, before it stops
def test_one_non_finite_step_is_skipped(tmp_path):
    out = faulty("nan_once", 4, "--max_iters=6", "--eval_interval=6", f"--out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row)" in out.stdout
    assert sorted(losses(tmp_path)) == list(range(1, 7))          # the skipped batch was not counted as a step


def test_repeated_non_finite_steps_stop_the_run_with_advice(tmp_path):
    out = faulty("nan_loss", 4, "--max_iters=50", "--eval_interval=2",
                 f"--out_dir={tmp_path}")
    assert out.returncode == 1
    assert "step 4: non-finite loss or gradient, update skipped (2 in a row)" in out.stdout
    stop = [line for line in out.stdout.splitlines() if line.startswith("stopping: ")]
    assert len(stop) == 1 and "10 non-finite steps in a row at step 4" in stop[0]   # runtime.MAX_BAD_STEPS
    # the step's learning rate (TINY's constant 2e-3) and gradient norm (NaN with the loss), and advice
    assert "lr 2.00e-03" in stop[0] and "gradient norm nan" in stop[0]
    assert "lower learning_rate" in stop[0] and "grad_clip=1" in stop[0] and "dtype=float32" in stop[0]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2   # the last good state is kept


# --- files that must not be trusted -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(straight):
    return str(straight / "ckpt.pt")


class RunsCode:
    """Unpickling this would run a shell command: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")     # torch's remark on the crafted file
def test_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_ckpt):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_ckpt, weights_only=True)
    state["payload"] = RunsCode(marker)
    evil = str(tmp_path / "evil.pt")
    torch.save(state, evil)
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        load_checkpoint(evil)
    out = run("sample.py", f"--ckpt={evil}", "--text=1 2 3", check=False)
    assert out.returncode == 2 and "cannot be loaded safely" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:                  # a bare pickle, not even a torch file
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        load_checkpoint(str(tmp_path / "plain.pkl"))
    assert not marker.exists()


def test_checkpoint_round_trip_is_weights_only_and_self_contained(tiny_ckpt):
    state = load_checkpoint(tiny_ckpt)
    assert state["step"] == 12 and state["kind"] == "transformer" and "optimizer" in state
    model, src_tok, tgt_tok = model_from_checkpoint(state)
    again, _, _ = model_from_checkpoint(load_checkpoint(tiny_ckpt))
    src = torch.tensor([src_tok.encode("1 2 3") + [src_tok.eos_id]])
    tgt = torch.tensor([[tgt_tok.bos_id] + tgt_tok.encode("3 2")])
    model.eval(), again.eval()
    assert torch.equal(model(src, tgt), again(src, tgt))


def test_missing_or_truncated_checkpoint_is_one_clear_error(tmp_path, tiny_ckpt):
    with pytest.raises(ConfigError, match="does not exist: train one with train.py or pass --ckpt"):
        load_checkpoint(str(tmp_path / "none.pt"))
    data = open(tiny_ckpt, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ConfigError, match="truncated, corrupt"):
        load_checkpoint(str(cut))


def test_checkpoint_of_another_shape_or_tokenizer_is_refused(tiny_ckpt):
    state = load_checkpoint(tiny_ckpt)
    wrong_shape = {**state, "model_config": {**state["model_config"], "d_ff": 128}}
    with pytest.raises(ConfigError, match="weights do not fit its model config"):
        model_from_checkpoint(wrong_shape)
    other_arch = {**state, "kind": "rnn", "model_config": {"src_vocab": 10, "tgt_vocab": 10, "pad_id": 0}}
    with pytest.raises(ConfigError, match="weights do not fit"):
        model_from_checkpoint(other_arch)
    toks = state["tokenizers"]
    fewer = {**toks, "src": {**toks["src"], "chars": toks["src"]["chars"][:-3]}}   # one joint vocabulary
    with pytest.raises(ConfigError, match="tokenizer does not match its model"):
        model_from_checkpoint({**state, "tokenizers": fewer})


def test_save_checkpoint_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"kind": "x", "model": {"w": torch.ones(3)}})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ConfigError, match="No space left on device"):
        save_checkpoint(path, {"kind": "x", "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]

