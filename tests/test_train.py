"""train.py and sample.py end to end on toy data: schedule (under max_minutes on a clock the test
moves), the log line, overfitting, exact resume, CLI, early stopping and averaging. One optimizer
step in-process: test_train_step.py; several processes: test_processes.py."""
import io
import json
import math
import os
import random
import re
import sys
import types

import pytest
import torch

import runtime
import train
from configurator import ConfigError, knob_names
from train import make_optimizer
from helpers import TINY, run, train_records

def test_one_cycle_schedule():
    cfg = dict(learning_rate=1e-3, min_lr=1e-5, warmup_frac=0.3, decay="cosine")
    assert train.lr_at(0.0, cfg) == 0.0
    assert train.lr_at(0.15, cfg) == pytest.approx(5e-4)            # half way up the warm-up
    assert train.lr_at(0.3, cfg) == pytest.approx(1e-3)             # the peak
    assert train.lr_at(0.65, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine mid-point
    assert train.lr_at(1.0, cfg) == pytest.approx(1e-5)
    assert train.lr_at(0.65, {**cfg, "decay": "exp"}) == pytest.approx(1e-4)   # geometric mid-point
    assert train.lr_at(1.0, {**cfg, "decay": "exp"}) == pytest.approx(1e-5)
    rsqrt = {**cfg, "decay": "rsqrt", "warmup_frac": 0.1}
    assert train.lr_at(0.05, rsqrt) == pytest.approx(5e-4)                 # the same warm-up
    assert train.lr_at(0.4, rsqrt) == pytest.approx(5e-4)                  # 4x the warm-up: half the peak
    assert train.lr_at(1.0, rsqrt) == pytest.approx(1e-3 * 0.1 ** 0.5)     # min_lr plays no part
    with pytest.raises(ConfigError, match="warmup_frac > 0"):
        train.lr_at(0.0, {**rsqrt, "warmup_frac": 0.0})
    with pytest.raises(ConfigError, match="cosin"):                         # at the first step, not after the warm-up
        train.lr_at(0.0, {**cfg, "decay": "cosin"})


def test_progress_takes_the_furthest_limit():
    cfg = dict(max_iters=100, max_epochs=0, max_minutes=10.0)
    assert train.run_progress(50, 3.0, 0.1, cfg) == 0.5
    assert train.run_progress(10, 3.0, 0.6, cfg) == 0.6
    assert train.run_progress(10, 3.0, 0.6, {**cfg, "max_minutes": 0.0}) == 0.1   # no time limit: no time progress


def test_the_time_clock_moves_with_training_only_and_ends_on_the_budget():
    """Steps of 1 s, a 7 s validation every 45 steps, a 10-minute budget: the clock p moves by about
    the same amount at every step, also at the step after a validation (the wall clock would jump by
    8 steps' worth there), and it reaches 1 as the wall clock reaches the budget."""
    cfg = dict(max_minutes=10.0, eval_interval=45)
    run, wall, train_time, gains = train.RunState(), 0.0, 0.0, []
    while wall < 600:                                  # as train_loop: the clocks, a step, maybe a validation
        before = run.time_progress
        wall, train_time, run.step = wall + 1, train_time + 1, run.step + 1
        if run.step % 45 == 0:
            wall += 7                                                # validation: wall clock only
        runtime.advance_clock(run, wall / 60, train_time / 60, cfg)
        gains.append(run.time_progress - before)
    assert run.time_progress == pytest.approx(1.0)
    # the first validation shows what validations cost: from then on the clock runs 52/45 as fast
    assert gains[:44] == pytest.approx([1 / 600] * 44)
    # (counting the validations to come as a fraction, the clock reaches 1 up to one validation's
    # time early: here 3 steps before the end)
    assert gains[44:-4] == pytest.approx([gains[44]] * len(gains[44:-4]), rel=0.01) and gains[-4] < gains[44]
    assert gains[44] == pytest.approx(1 / 600 * 52 / 45, rel=0.02)
    assert run.minutes == pytest.approx(wall / 60) and run.train_minutes == pytest.approx(train_time / 60)
    plain = train.RunState()
    for t in (1, 2, 3):                                              # without validation: p = minutes / budget
        runtime.advance_clock(plain, t, t, cfg)
        assert plain.time_progress == pytest.approx(t / 10)


def test_a_resumed_run_keeps_its_clock_and_a_new_budget_or_an_older_checkpoint_restarts_it():
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, dict(weight_decay=0.0, learning_rate=1e-3))
    saved = dict(optimizer=optimizer.state_dict(), train_config=dict(max_minutes=10.0), step=50, minutes=4.0,
                 train_minutes=3.0, time_progress=0.35)
    rt = runtime.Runtime("cpu", "float32")
    resume = lambda ckpt, budget: rt.start(optimizer, dict(max_minutes=budget), ckpt, train.RunState)  # noqa: E731
    assert resume(saved, 10.0).time_progress == 0.35 and resume(saved, 10.0).train_minutes == 3.0
    assert resume(saved, 20.0).time_progress == pytest.approx(0.2)   # --max_minutes=20: as if planned so
    older = {k: v for k, v in saved.items() if k not in ("train_minutes", "time_progress")}
    assert resume(older, 10.0).time_progress == pytest.approx(0.4) and resume(older, 10.0).train_minutes == 4.0


class FakeClock:
    """The run's clock (runtime.py's time.time), moved by the test alone: each training step takes
    `step` seconds and each validation `validation` seconds, however fast or busy this machine is.
    After ctrl_c_during(N), a Ctrl-C arrives during step N (as runtime.RunClock notes it)."""

    def __init__(self, monkeypatch, step: float = 1.0, validation: float = 5.0):
        self.monkeypatch, self.now, self.steps, self.stop_at = monkeypatch, 0.0, 0, None
        loop_step, evaluate = train.loop_step, train.evaluate

        def timed_step(*args, **kwargs):
            self.now, self.steps = self.now + step, self.steps + 1
            return loop_step(*args, **kwargs)

        def timed_evaluate(*args, **kwargs):
            self.now += validation
            return evaluate(*args, **kwargs)
        monkeypatch.setattr(runtime, "time", types.SimpleNamespace(time=lambda: self.now))
        monkeypatch.setattr(train, "loop_step", timed_step)
        monkeypatch.setattr(train, "evaluate", timed_evaluate)

    def ctrl_c_during(self, step: int | None) -> None:
        clock, self.steps, self.stop_at = self, 0, step
        tick = runtime.RunClock.tick

        def tick_after_ctrl_c(run_clock, run):
            if clock.stop_at is not None and clock.steps >= clock.stop_at:
                run_clock.received = "SIGINT"                # as RunClock.note would on a Ctrl-C
            return tick(run_clock, run)
        self.monkeypatch.setattr(runtime.RunClock, "tick", tick_after_ctrl_c)


def test_a_validation_leaves_no_step_in_the_learning_rate(tmp_path, monkeypatch):
    """A 1-minute budget of 1 s steps with a 5 s validation every 10 steps, on a clock the test
    moves: the learning rate (all warm-up, so linear in the schedule's clock) rises by as much at
    the step after a validation as at the step before it. After the first one, which shows what
    validations cost, it rises 1.6x as fast from then on; the wall clock's share of the budget would
    rise 6x at every validation (5 s of validation + 1 s of training)."""
    FakeClock(monkeypatch, step=1.0, validation=5.0)
    state = train.main([*TINY, f"--out_dir={tmp_path}", "--max_minutes=1", "--eval_interval=10", "--eval_sentences=5",
                        "--warmup_frac=1.0", "--learning_rate=1e-3"])
    lr = {r["step"]: r["lr"] for r in train_records(tmp_path)}
    rise = {s: lr[s] - lr[s - 1] for s in lr if s - 1 in lr}
    first, *later = [r["step"] for r in train_records(tmp_path, "eval") if r["step"] + 1 in rise]
    assert first == 10 and len(later) >= 2
    assert rise[first] < rise[first + 1] < 2 * rise[first]
    assert [rise[s + 1] for s in later] == pytest.approx([rise[s] for s in later], rel=0.01)
    assert 1.0 <= state.minutes < 1.0 + 6 / 60 and lr[state.step] > 0.95e-3   # the budget spent, the peak reached


def test_a_run_resumed_under_max_minutes_keeps_its_schedule(tmp_path, monkeypatch):
    """Stopped by Ctrl-C at step 15 of a 1-minute budget (on a clock the test moves, as above) and
    resumed, a run takes the learning rates of the uninterrupted run, step by step: the schedule goes
    on where it stood, neither back to the warm-up nor restarted over the budget."""
    clock = FakeClock(monkeypatch)
    knobs = [*TINY, "--max_minutes=1", "--eval_interval=10", "--eval_sentences=5"]
    train.main([*knobs, f"--out_dir={tmp_path / 'straight'}"])
    clock.ctrl_c_during(15)
    assert train.main([*knobs, f"--out_dir={tmp_path / 'resumed'}"]).step == 15
    clock.ctrl_c_during(None)
    train.main([f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume"])
    straight, resumed = ({r["step"]: r["lr"] for r in train_records(tmp_path / d)} for d in ("straight", "resumed"))
    assert list(resumed) == list(straight) and len(straight) > 30
    assert list(resumed.values()) == pytest.approx(list(straight.values()), rel=1e-9, abs=0)


def test_overfit_one_batch_drives_loss_near_zero(tmp_path):
    out = run("train.py", *TINY, f"--out_dir={tmp_path}", "--overfit_batches=1", "--max_iters=120",
              "--learning_rate=3e-3", "--warmup_frac=0.1", "--eval_interval=1000", "--eval_sentences=10")
    assert "overfit mode" in out.stdout
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert losses[0] > 2.0 and losses[-1] < 0.05


@pytest.mark.slow      # ~45 s: 400 steps of the toy config
def test_tiny_transformer_solves_reverse_task_and_beam_search_scores_at_least_greedy(tmp_path):
    # the shipped sanity-check config, shortened from 600 to 400 steps (validation BLEU 96-97 instead
    # of 99.5: a sentence or two of the test inputs may come out wrong, so sample.py is checked against
    # the model's own beam search below, not against the reversed digits)
    out = run("train.py", "config/toy_reverse.py", f"--out_dir={tmp_path}", "--log_interval=100", "--max_iters=400",
              "--eval_interval=400", "--plot=False")
    assert "step 0: loss" in out.stdout and "warning" not in out.stdout     # a clean start: no cry of wolf
    final = train_records(tmp_path, "eval")[-1]
    assert final["bleu"] > 95, final

    from checkpoint import load_checkpoint, model_from_checkpoint
    from data import data_of_checkpoint
    from decoding import translate_nbest
    checkpoint = load_checkpoint(str(tmp_path / "best.pt"))
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint)
    test_split = data_of_checkpoint(checkpoint, "", verbose=False).splits["test"]
    sources = test_split.src_text[:100]
    greedy = [found[0][1] for found in translate_nbest(model, src_tok, tgt_tok, sources)]
    beam = [found[0][1] for found in translate_nbest(model, src_tok, tgt_tok, sources, beam=4, alpha=0.0)]
    # beam search keeps the greedy path among its candidates unless it finds better ones
    assert all(b >= g - 1e-4 for b, g in zip(beam, greedy))

    ckpt, plot = str(tmp_path / "best.pt"), tmp_path / "attention.png"
    nbest = run("sample.py", f"--ckpt={ckpt}", "--beam=3", "--nbest=2", "--dtype=float32",
                "--plot_attention=" + str(plot), stdin="4 5 6\n\n7 8 9 0 1\n")
    lines = [line.split("\t") for line in nbest.stdout.splitlines()]
    assert [n for n, _, _ in lines] == ["1", "1", "2", "2", "3", "3"]
    expected = translate_nbest(model, src_tok, tgt_tok, ["4 5 6", "", "7 8 9 0 1"], beam=3, alpha=0.6, nbest=2)
    assert [text for _, _, text in lines] == [text for found in expected for text, _ in found]
    assert lines[2][2] == "" and float(lines[0][1]) >= float(lines[1][1])
    assert plot.exists() and plot.stat().st_size > 10_000
    baseline = tmp_path / "baseline.txt"                      # a "system" that writes the references: BLEU 100
    baseline.write_text("\n".join(test_split.tgt_text) + "\n")
    scored = run("sample.py", f"--ckpt={ckpt}", "--split=test", "--scores")
    assert "BLEU" in scored.stderr and "nrefs:1" in scored.stderr and "greedy" in scored.stderr
    assert "case:lc" in scored.stderr
    assert len(scored.stdout.splitlines()) == 500
    assert all(float(line.split("\t")[0]) <= 0 for line in scored.stdout.splitlines())
    compared = run("tools/compare.py", f"--ckpt={ckpt}", "--split=test", f"--compare={baseline}")
    assert "vs 100.00" in compared.stdout and "p = " in compared.stdout


# one GRU layer each side: deep GRUs learn this toy task slowly from scratch (400 steps of
# toy:reverse gave validation BLEU 56 with 1 layer, 21 with 2, ~1 with 3)
GRU = ["--arch=rnn", "--emb_dim=32", "--n_enc_layer=1", "--n_dec_layer=1", "--attention=dot"]


def test_gru_overfits_one_batch(tmp_path):
    run("train.py", *TINY, *GRU, f"--out_dir={tmp_path}", "--hidden_size=64", "--overfit_batches=1",
        "--max_iters=100", "--learning_rate=1e-2", "--warmup_frac=0.05", "--batch_tokens=800",
        "--eval_interval=1000", "--eval_sentences=10")
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert losses[0] > 2.0 and losses[-1] < 0.05


@pytest.mark.slow      # ~13 s; test_gru_overfits_one_batch covers the GRU's wiring in the default run
def test_tiny_gru_with_attention_solves_reverse_task(tmp_path):
    run("train.py", *TINY, *GRU, f"--out_dir={tmp_path}", "--hidden_size=96", "--bidirectional",
        "--max_iters=300", "--learning_rate=1e-2", "--warmup_frac=0.05", "--dropout=0", "--batch_tokens=3000",
        "--eval_interval=300", "--eval_sentences=100", "--log_interval=50")
    final = train_records(tmp_path, "eval")[-1]
    assert final["bleu"] > 90, final


# slow: test_faults.py's SIGKILL test resumes a Transformer three times in the default run
@pytest.mark.slow
@pytest.mark.parametrize("arch", [[], [*GRU, "--teacher_forcing=0.5"]], ids=["transformer", "gru"])
def test_resume_continues_exactly(tmp_path, arch):
    # a constant learning rate, so that stopping the first half at step 6 leaves the schedule alone;
    # the GRU draws random numbers for teacher forcing, so its resume needs the saved RNG state
    common = [*TINY, *arch, "--dropout=0.1", "--eval_interval=6", "--eval_sentences=5", "--max_iters=12",
              "--warmup_frac=0", "--learning_rate=2e-3", "--min_lr=2e-3"]
    run("train.py", *common, f"--out_dir={tmp_path / 'a'}")
    straight = {r["step"]: r["loss"] for r in train_records(tmp_path / "a")}
    run("train.py", *common, f"--out_dir={tmp_path / 'b'}", "--max_iters=6")
    run("train.py", f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--max_iters=12")  # the saved config
    resumed = {r["step"]: r["loss"] for r in train_records(tmp_path / "b")}
    assert set(resumed) == set(range(1, 13))
    for step in range(7, 13):
        assert resumed[step] == straight[step], step           # bit-identical, dropout included


def test_train_then_sample_end_to_end(tmp_path):
    out = run("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=20", "--plot=True")
    assert "ln(V)" in out.stdout and "BLEU" in out.stdout
    for name in ("ckpt.pt", "best.pt", "log.jsonl", "plots.png"):
        assert os.path.exists(tmp_path / name), name
    # (sample.py --text is run in test_prune.py, --split in the reverse-task test above)
    piped = run("sample.py", f"--ckpt={tmp_path / 'best.pt'}", stdin="4 5 6\n\n7 8 9 0 1\n")
    lines = piped.stdout.split("\n")[:-1]
    assert len(lines) == 3 and lines[1] == ""                  # empty input line -> empty output line


def shown(line: str, pattern: str) -> list[float]:
    """The numbers a printed line shows in `pattern`'s groups ("12,345" -> 12345.0)."""
    return [float(x.replace(",", "")) for x in re.search(pattern, line).groups()]


def test_every_log_line_has_both_sides_gradient_norms_lr_speed_padding_and_memory(tmp_path, capsys):
    """What README promises of every log line, as log.jsonl keeps it and as it is printed: the
    gradient norm of encoder and decoder apart and their total (gnorm = hypot of the two sides),
    the learning rate the step took, tokens/s, padding, peak memory, the loss."""
    train.main([*TINY, f"--out_dir={tmp_path}", "--max_iters=6", "--eval_interval=6", "--eval_sentences=5"])
    records = train_records(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"step +\d+ \|", line)]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and len(lines) == 6
    assert any(r["pad"] > 0 for r in records)                 # (the toy task's batches are mostly unpadded)
    cfg = {**train.DEFAULTS, "max_iters": 6}                  # TINY keeps the default schedule
    for r, line in zip(records, lines):
        assert r["gnorm_enc"] > 0 and r["gnorm_dec"] > 0
        assert r["gnorm"] == pytest.approx(math.hypot(r["gnorm_enc"], r["gnorm_dec"]), rel=1e-5)
        assert r["lr"] == pytest.approx(train.lr_at((r["step"] - 1) / 6, cfg), rel=1e-9, abs=0)
        assert r["tok_per_s"] > 0 and 0 <= r["pad"] < 1 and r["peak_gb"] > 0 and 0 < r["loss"] < 10
        # the printed line shows the record's values, rounded
        assert shown(line, r"^step +(\d+) ") == [r["step"]]
        assert shown(line, r"\| loss ([\d.]+) \|") == pytest.approx([r["loss"]], abs=5e-5)
        assert shown(line, r"\| lr ([\d.e+-]+) \|") == pytest.approx([r["lr"]], rel=5e-3)
        assert shown(line, r"\| gnorm ([\d.]+) \(enc ([\d.]+) dec ([\d.]+)\)") == pytest.approx(
            [r["gnorm"], r["gnorm_enc"], r["gnorm_dec"]], abs=5e-3)
        assert shown(line, r"\| ([\d,]+) tok/s") == pytest.approx([r["tok_per_s"]], abs=0.5)
        assert shown(line, r"\| pad ([\d.]+)%") == pytest.approx([100 * r["pad"]], abs=0.05)
        assert shown(line, r"\| peak ([\d.]+) GB") == pytest.approx([r["peak_gb"]], abs=5e-3)


def test_a_lower_cased_model_reads_its_input_lower_cased(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    words, rng = "the cat sees a dog in the park".split(), random.Random(0)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(300):
            sentence = " ".join(rng.choice(words) for _ in range(5))
            f.write(json.dumps({"en": sentence.capitalize(), "xx": sentence.upper()}) + "\n")
    run("train.py", *TINY, f"--dataset={folder}", "--dataset_config=", "--src_lang=en", "--tgt_lang=xx",
        "--tokenizer=bpe", "--vocab_size=300", "--lowercase=True", f"--out_dir={tmp_path}", "--max_iters=2",
        "--eval_interval=2", "--eval_sentences=5")
    from checkpoint import load_checkpoint
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["data_config"]["lowercase"] is True
    cased = load_checkpoint(str(tmp_path / "ckpt.pt"))
    cased["data_config"]["lowercase"] = False                 # the same model, taken for one trained on cased text
    torch.save(cased, tmp_path / "cased.pt")
    # what the model reads: the source ids sample.py gives its encoder, one row per input line (a model
    # trained for 2 steps translates every line alike, so its output would show nothing)
    import sample
    for knob in knob_names(vars(sample)):                    # sample.main() sets its knobs from sys.argv
        monkeypatch.setattr(sample, knob, getattr(sample, knob))
    read, model_from_checkpoint = [], sample.model_from_checkpoint

    def spied(*args, **kwargs):
        model, src_tok, tgt_tok = model_from_checkpoint(*args, **kwargs)
        encode = model.encode
        model.encode = lambda src: read.extend(src.tolist()) or encode(src)
        return model, src_tok, tgt_tok
    monkeypatch.setattr(sample, "model_from_checkpoint", spied)
    for ckpt in ("ckpt.pt", "cased.pt"):
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--ckpt={tmp_path / ckpt}", "--dtype=float32"])
        monkeypatch.setattr(sys, "stdin", io.StringIO("The Cat sees a dog\nTHE CAT SEES A DOG\nthe cat sees a dog\n"))
        sample.main()
    lowered, kept = read[:3], read[3:]
    assert len(capsys.readouterr().out.splitlines()) == 6 and len(kept) == 3
    assert lowered[0] == lowered[1] == lowered[2]
    assert len({tuple(row) for row in kept}) == 3             # the spy sees case where the model does
    # comparing it with a model trained on cased text would score the two on different text
    out = run("tools/compare.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--split=validation",
              f"--compare={tmp_path / 'cased.pt'}", check=False)
    assert out.returncode == 2 and "trained on lower-cased text" in out.stderr and "Traceback" not in out.stderr


def test_a_checkpoint_from_before_a_data_knob_existed_takes_its_default():
    from data import DataConfig
    old = {k: v for k, v in train.DEFAULTS.items() if k != "lowercase"}
    assert DataConfig.of(old).lowercase is False


@pytest.mark.slow      # ~10 s: three short runs
def test_a_checkpoint_resumes_under_another_precision(tmp_path):
    """What moving a run between machines changes: fp16 with loss scaling (a T4) -> bf16 (a CPU,
    an A100) -> fp16 again, which starts a new loss scale. Checkpoints hold CPU tensors
    (torch.load(map_location='cpu')); the optimizer moves its state to wherever the model is."""
    common = [*TINY, f"--out_dir={tmp_path}", "--eval_interval=4", "--eval_sentences=5"]
    run("train.py", *common, "--dtype=float16", "--max_iters=4")
    from checkpoint import load_checkpoint
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["scaler"]["scale"] > 0
    run("train.py", *common, "--init_from=resume", "--dtype=bfloat16", "--max_iters=8")
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["scaler"] is None
    out = run("train.py", *common, "--init_from=resume", "--dtype=float16", "--max_iters=12")
    assert "dtype float16" in out.stdout
    assert [r["step"] for r in train_records(tmp_path)] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) for r in train_records(tmp_path))


# test_cuda.py's bf16 curve on a CPU; no skip without bf16 instructions: a width-32 model's bf16
# steps, emulated there, take 2x fp32's (AVX2 EPYC), not the 40x of real widths
@pytest.mark.slow      # ~20 s: 200 steps in fp32, 200 in bf16
def test_bf16_follows_the_fp32_loss_curve_on_a_cpu(tmp_path):
    common = [*TINY, "--max_iters=200", "--eval_interval=200", "--log_interval=20", "--learning_rate=3e-3",
              "--dropout=0"]
    run("train.py", *common, "--dtype=float32", f"--out_dir={tmp_path / 'fp32'}")
    out = run("train.py", *common, "--dtype=bfloat16", f"--out_dir={tmp_path / 'bf16'}")
    assert "dtype bfloat16" in out.stdout
    fp32, bf16 = ([r["loss"] for r in train_records(tmp_path / d) if r["step"] >= 100] for d in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 6 and fp32 != bf16                    # bf16 did round differently
    assert all(abs(a - b) < 0.15 * a + 0.05 for a, b in zip(fp32, bf16)), (fp32, bf16)


# misspelled knobs ("Did you mean") are checked in-process in test_configurator.py
@pytest.mark.parametrize("args, message", [
    pytest.param([], "no stop condition", marks=pytest.mark.slow),
    (["--max_iters=1", "--arch=lstm"], "arch='lstm'"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    out = run("train.py", *TINY, f"--out_dir={tmp_path}", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_the_data_knobs_are_train_knobs_declared_once_in_data_config():
    from dataclasses import asdict

    from data import DataConfig
    assert {k: train.DEFAULTS[k] for k in asdict(DataConfig())} == asdict(DataConfig())
    assert not any(hasattr(train, k) for k in asdict(DataConfig()))


def test_loss_spike_is_flagged_once_the_mean_is_built():
    import numpy as np
    from common import SpikeWatch
    rng = np.random.default_rng(0)
    watch = SpikeWatch(2.0, warmup=50)
    assert watch(50.0) is None                          # no verdict while the mean is being built
    for loss in 2.0 + 0.2 * rng.standard_normal(200):
        assert watch(float(loss)) is None               # ordinary noise
    mean = watch(7.0)
    assert mean is not None and 2.0 < mean < 2.6        # the early 50 has been averaged away
    assert watch(2.1) is None and watch(7.0) is not None   # the spike did not raise the mean
    assert SpikeWatch(0.0, warmup=0)(100.0) is None     # factor 0 = off



def test_early_stopping_and_the_average_of_the_last_snapshots(tmp_path):
    (tmp_path / "snapshots").mkdir()                            # an earlier run's snapshot, and a killed write
    torch.save({"stale": True}, tmp_path / "snapshots" / "step_0000001.pt")
    (tmp_path / "snapshots" / "step_0000004.pt.tmp").write_bytes(b"half a file")
    # a learning rate of ~0: validation BLEU cannot improve after the first evaluation
    out = run("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=2", "--eval_sentences=10",
              "--learning_rate=1e-12", "--min_lr=1e-12", "--patience=2", "--average_last=2", "--average_every=3")
    assert "early stopping: no better validation BLEU in 2 evaluations" in out.stdout
    evals = train_records(tmp_path, "eval")
    assert [r["step"] for r in evals] == [2, 4, 6] and all("bleu_lc" in r for r in evals)
    from checkpoint import average_checkpoints, load_checkpoint, snapshots
    kept = snapshots(str(tmp_path))
    assert [s for s, _ in kept] == [3, 6]                       # every 3 steps, the last 2 kept; 6 = the end
    assert not (tmp_path / "snapshots" / "step_0000001.pt").exists()     # a new run averages only its own
    avg, (a, b) = load_checkpoint(str(tmp_path / "avg.pt")), (load_checkpoint(p) for _, p in kept)
    for k, v in avg["model"].items():
        assert torch.allclose(v, (a["model"][k] + b["model"][k]) / 2), k
    assert avg["model"].keys() == average_checkpoints([p for _, p in kept])["model"].keys()
    assert train_records(tmp_path, "average")[0]["snapshots"] == 2
    cli = run("tools/average.py", f"--average={tmp_path}/snapshots/*.pt", f"--out={tmp_path / 'cli.pt'}")
    assert "averaged 2 checkpoints" in cli.stdout
    assert all(torch.equal(v, load_checkpoint(str(tmp_path / "cli.pt"))["model"][k]) for k, v in avg["model"].items())
