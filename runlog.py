"""
What a training run tells you while it runs and after it: one printed line and one
log.jsonl record per log interval or evaluation (RunLog), plots.png drawn from log.jsonl
(plot_log), and the loss-spike detector (SpikeWatch). train.py's loop calls these; nothing
here knows about models. A resumed run rewinds log.jsonl to its checkpoint, so a step killed
before it was saved is logged once, by the run that redid it.
"""

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field


class RunLog:
    """Prints one fixed-format line per record and appends the same record to log.jsonl.

    resume_step: the step of the checkpoint a run resumes from. A run that was killed logged
    steps after its last checkpoint (and maybe half a line); they will be run again, so their
    records are dropped first and every step appears once in the log. None: a new run, which
    starts a new log (an old run's log.jsonl in the same folder is replaced)."""

    def __init__(self, out_dir: str, enabled: bool, bar=None, resume_step: int | None = None):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled, self.bar = enabled, bar
        if enabled and resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        elif enabled and resume_step is not None and os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(json.JSONDecodeError):   # a line cut short by a kill
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def say(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def record(self, kind: str, line: str, **values) -> None:
        self.say(line)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"kind": kind, **values}) + "\n")


def plot_log(out_dir: str) -> str:
    """Draw loss, learning rate, gradient norm and validation BLEU from log.jsonl into plots.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (smoothed labels)")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_title("loss")
    ax.legend()
    axes[0, 1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[0, 1].set_title("learning rate")
    ax = axes[1, 0]
    for key in ("gnorm", "gnorm_enc", "gnorm_dec"):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set_yscale("log")
    ax.set_title("gradient norm (before clipping)")
    ax.legend()
    axes[1, 1].plot([r["step"] for r in val], [r["bleu"] for r in val], "o-")
    axes[1, 1].set_title("validation BLEU")
    for ax in axes.flat:
        ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out_dir, "plots.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def printable(extra: dict, sep: str) -> str:
    """The scalar entries of an extra-log dict as text (lists/dicts are for log.jsonl only)."""
    return "".join(f"{sep}{k} {v}" for k, v in extra.items() if not isinstance(v, (list, dict)))


class SpikeWatch:
    """Flags a loss spike: a step whose loss exceeds `factor` x the running mean of the losses
    before it (exponential, ~100 steps), plus 0.1 so the near-zero losses of overfit mode do not
    count. The first 50 steps only build the mean. One spike is noise; spikes that repeat, or a
    loss that stays up after one, call for a lower learning rate, more warm-up or clipping."""

    def __init__(self, factor: float, warmup: int = 50, decay: float = 0.99):
        self.factor, self.warmup, self.decay = factor, warmup, decay
        self.mean, self.seen = 0.0, 0

    def __call__(self, loss: float) -> float | None:
        """Feed one step's loss; returns the running mean it jumped above, or None."""
        spike = self.factor > 0 and self.seen >= self.warmup and loss > self.factor * self.mean + 0.1
        if not spike:              # a spike does not drag the mean up with it
            self.seen += 1
            weight = min(self.decay, 1 - 1 / self.seen)      # a plain average until ~100 steps
            self.mean = weight * self.mean + (1 - weight) * loss
        return self.mean if spike else None


@dataclass
class Interval:
    """Sums over the steps since the last log line."""
    steps: int = 0
    loss: float = 0.0
    tokens: int = 0
    padding: int = 0
    cells: int = 0
    overflows: int = 0
    started: float = field(default_factory=time.time)

    def add(self, out: dict, batches: list, src_pad: int, tgt_pad: int) -> None:
        """Count one step: its report from train_step and its (CPU) batches (src, tgt_in, tgt_out)."""
        self.steps += 1
        self.loss += out["loss"]
        self.tokens += out["tokens"]
        self.overflows += out["update"] == "overflow"
        for src, tgt_in, _ in batches:
            self.padding += int((src == src_pad).sum() + (tgt_in == tgt_pad).sum())
            self.cells += src.numel() + tgt_in.numel()


def log_step(log: RunLog, run, epochs: float, lr: float, out: dict, iv: Interval, extra: dict) -> None:
    """One log line (and log.jsonl record): the interval's mean loss, the last step's gradient
    norms, tokens/s and padding over the interval, fp16 overflows if there were any."""
    rec = dict(step=run.step, epoch=round(epochs, 3), loss=iv.loss / iv.steps, lr=lr, gnorm=out["gnorm"],
               gnorm_enc=out["gnorm_enc"], gnorm_dec=out["gnorm_dec"],
               tok_per_s=iv.tokens / max(time.time() - iv.started, 1e-9), pad=iv.padding / max(iv.cells, 1),
               minutes=run.minutes, **({"overflows": iv.overflows} if iv.overflows else {}), **extra)
    log.record("train", f"step {run.step:>6} | epoch {epochs:6.2f} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
               f"gnorm {out['gnorm']:.2f} (enc {out['gnorm_enc']:.2f} dec {out['gnorm_dec']:.2f}) | "
               f"{rec['tok_per_s']:,.0f} tok/s | pad {rec['pad']:.1%} | {run.minutes:.1f} min"
               + printable(({"overflows": iv.overflows} if iv.overflows else {}) | extra, " | "), **rec)


def progress_bar():
    """A progress bar in percent of the run (of steps, epochs or minutes), on a terminal only."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=100, unit="%", dynamic_ncols=True, leave=False, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
