"""
The plumbing every script shares (nanochat's common.py idea), at the bottom of the house: it
imports no concept above it. Which device and precision a process takes (`place`, `pick_dtype`;
runtime.setup puts them together), and what a run reports while it runs: the log line and
log.jsonl (RunLog), the step log's line every log_interval steps (StepLog), plots.png.

    log = RunLog("out/run", enabled=True)
    log.record("eval", "eval step 500: BLEU 31.2", step=500, bleu=31.2)   # printed, and a line of log.jsonl

Leaves out: Apple MPS, TPUs, TensorBoard.
"""

import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from configurator import ConfigError

# oneDNN (bf16 matrix products on CPUs with AMX) keeps a compiled kernel for each new matrix shape,
# up to 1,024, and bucketed batches bring new shapes all the time: on a 2-core Sapphire Rapids a
# bf16 run of config/transformer_multi30k.py grew to 4.2 GB, 2.1 GB with 16 kept, at the same
# speed. oneDNN reads this when it first compiles, after imports and before any matrix product.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


# -----------------------------------------------------------------------------
# where a run executes

@dataclass
class Placement:
    """Which device this process uses and which process it is."""
    device: str             # 'cpu', 'cuda', 'cuda:3'
    rank: int = 0           # this process among all (0 = the one that logs and saves)
    local_rank: int = 0     # this process among those on its machine (picks its GPU)
    world_size: int = 1     # processes in the run
    backend: str = ""       # process-group backend: 'nccl' on GPUs, 'gloo' on CPUs, '' for one process


def place(device: str, env: dict, n_gpus: int) -> Placement:
    """Resolve the device knob for this process from the environment torchrun sets (RANK,
    LOCAL_RANK, WORLD_SIZE) and the number of visible GPUs: a pure function, tested with fakes.

        place('auto', {}, 0)                                                  -> cpu, one process
        place('auto', {'RANK': '3', 'LOCAL_RANK': '1', 'WORLD_SIZE': '4'}, 2) -> cuda:1, rank 3 of 4, nccl
    """
    world_size = int(env.get("WORLD_SIZE", 1))
    rank, local_rank = int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if n_gpus > 0 else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device='{device}' is not known: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and n_gpus == 0:
        raise ConfigError(f"device='{device}' but no CUDA GPU is visible here: use --device=cpu")
    if world_size == 1:
        return Placement(device)
    if device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(f"device='{device}' under torchrun: every process would use that one GPU. Use "
                              "--device=cuda (process i takes GPU LOCAL_RANK=i); choose GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank >= n_gpus:
            raise ConfigError(f"process LOCAL_RANK={local_rank} has no GPU: {n_gpus} visible. Start at most "
                              f"{n_gpus} processes per machine (torchrun --nproc_per_node={n_gpus})")
        device = f"cuda:{local_rank}"
    return Placement(device, rank, local_rank, world_size, "nccl" if device.startswith("cuda") else "gloo")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX, e.g. Intel Sapphire
    Rapids, AMD Zen 4). Without them bf16 matrix products fall back to a plain loop: on an AVX2 AMD EPYC
    a training step ran 40x slower in bf16 than in fp32 (docs/performance.md)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(dtype: str, device_type: str, capability: tuple[int, int] | None = None,
               cpu_bf16: bool = True) -> str:
    """'auto' -> 'bfloat16' on GPUs of compute capability 8.0+ (A100, H100) and on CPUs with bf16
    instructions (cpu_bf16), 'float16' (with loss scaling) on older GPUs (T4, V100), which would
    emulate bf16 slowly, 'float32' on other CPUs."""
    if dtype == "auto":
        if device_type == "cpu":
            return "bfloat16" if cpu_bf16 else "float32"
        return "bfloat16" if (capability or (0, 0)) >= (8, 0) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype='{dtype}' is not known: use auto, float32, bfloat16 or float16")
    return dtype


# -----------------------------------------------------------------------------
# what a run reports

class RunLog:
    """Prints one line per record and appends the record to out_dir/log.jsonl.

    resume_step: the step of the checkpoint a run resumes from. The killed run logged steps after
    it (and maybe half a line); they will be run again, so they are dropped and every step is
    logged once. None: a new run, which starts a new log. watchers: callables that look at each
    record, (kind, values) -> [(warning name, text)], warned about after it (train.py gives it
    watch.Symptoms)."""

    def __init__(self, out_dir: str, enabled: bool, bar=None, resume_step: int | None = None, watchers=()):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled, self.bar, self.watchers = enabled, bar, list(watchers)
        if not enabled or not os.path.exists(self.path):
            return
        kept = []
        if resume_step is not None:
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(json.JSONDecodeError):   # a line cut short by a kill
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def say(self, text: str) -> None:
        if self.enabled:    # (flushed: a pipe would otherwise hold the lines back until the run ends)
            (self.bar.write if self.bar is not None else print)(text, **({} if self.bar is not None else {"flush": True}))

    def record(self, kind: str, line: str, **values) -> None:
        """Print `line`; append {"kind": kind, **values} to log.jsonl (lists and dicts go there only);
        then the warnings that the watchers find in it."""
        self.say(line)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"kind": kind, **values}) + "\n")
            for watch in self.watchers:
                for name, text in watch(kind, values):
                    self.warn(name, text, values.get("step", 0))

    def warn(self, name: str, text: str, step: int = 0) -> None:
        """A diagnostic: "warning: TEXT" in the log, {"kind": "warning", "name": NAME, ...} in log.jsonl."""
        self.record("warning", f"warning: {text}", name=name, step=step, text=text)


class TensorBoard:
    """A RunLog watcher (train.py --tensorboard=True) that copies each record to TensorBoard: its numbers
    under kind/key at its step (train/loss, eval/bleu, ...), a warning's text under warning/<name>. In
    out_dir/tensorboard (tensorboard --logdir out_dir); a resumed run drops what the killed one logged
    after its checkpoint, as RunLog does. Needs the tensorboard package."""

    def __init__(self, out_dir: str, resume_step: int | None = None, writer=None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard=True needs the tensorboard package: pip install tensorboard "
                                  "(log.jsonl holds the same numbers without it)") from None
            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step)
        self.writer = writer

    def __call__(self, kind: str, values: dict) -> list:
        step = values.get("step", 0)
        if kind == "warning":
            self.writer.add_text(f"warning/{values['name']}", values["text"], step)
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()
        return []                               # (it warns about nothing)


def printable(extra: dict, sep: str) -> str:
    """The scalar entries of a dict as text (lists and dicts are for log.jsonl only)."""
    return "".join(f"{sep}{k} {v}" for k, v in extra.items() if not isinstance(v, (list, dict)))


def progress_bar():
    """A progress bar in percent of the run (of steps, epochs or minutes), on a terminal only."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=100, unit="%", dynamic_ncols=True, leave=False, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")


def plot_log(out_dir: str) -> str:
    """Draw loss, learning rate, gradient norm and validation BLEU from log.jsonl into plots.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "eval"]
    steps, val_steps = [r["step"] for r in train], [r["step"] for r in val]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].plot(steps, [r["loss"] for r in train], label="train (smoothed labels)")
    axes[0, 0].plot(val_steps, [r["val_loss"] for r in val], "o-", label="validation")
    axes[0, 0].legend()
    axes[0, 1].plot(steps, [r["lr"] for r in train])
    for key in ("gnorm", "gnorm_enc", "gnorm_dec"):
        axes[1, 0].plot(steps, [r[key] for r in train], label=key)
    axes[1, 0].set_yscale("log")
    axes[1, 0].legend()
    axes[1, 1].plot(val_steps, [r["bleu"] for r in val], "o-")
    for ax, title in zip(axes.flat, ("loss", "learning rate", "gradient norm (before clipping)", "validation BLEU")):
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out_dir, "plots.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class StepLog:
    """The log line of every log_interval-th step: the mean loss since the last line, the last
    step's gradient norms (all, encoder side, decoder side), target tokens/s (this process's),
    padding, peak memory, fp16 overflows, and what the run adds (prune.py: its gates); the progress
    bar; loss spikes, a step whose loss exceeds 2x the running mean of those before it (SpikeWatch).
    One spike is noise; spikes that repeat, or a loss that stays up after one, call for a lower
    learning rate, more warm-up or clipping. checks: an object with at_step(run, batches) and
    at_log_line(step, lr), called after every step and every log line (train.py gives it
    watch.StepChecks)."""

    def __init__(self, log: RunLog, src_pad: int, tgt_pad: int, device_type: str = "cpu", checks=None):
        self.log, self.src_pad, self.tgt_pad, self.spikes = log, src_pad, tgt_pad, SpikeWatch(2.0)
        self.device_type, self.checks = device_type, checks
        self.restart()

    def restart(self) -> None:
        self.steps = self.tokens = self.padding = self.cells = self.overflows = 0
        self.loss, self.started = 0.0, time.time()

    def add(self, run, lr: float, out: dict, batches: list, progress: float) -> None:
        """Count one step: its report from train.train_step and its (CPU) batches (src, tgt_in, tgt_out)."""
        self.steps, self.loss, self.tokens = self.steps + 1, self.loss + out["loss"], self.tokens + out["tokens"]
        self.overflows, self.progress = self.overflows + (out["update"] == "overflow"), progress
        for src, tgt_in, _ in batches:
            self.padding += int((src == self.src_pad).sum() + (tgt_in == self.tgt_pad).sum())
            self.cells += src.numel() + tgt_in.numel()
        running = self.spikes(out["loss"])
        if running is not None:
            self.log.warn("loss_spike", f"loss spike at step {run.step}: {out['loss']:.3f}, running mean {running:.3f} "
                          f"(lr {lr:.2e}, gradient norm {out['gnorm']:.2f}). If it repeats or the loss stays "
                          "up: lower learning_rate, longer warmup_frac, grad_clip=1.", run.step)
        if self.checks is not None:
            self.checks.at_step(run, batches)
        if self.log.bar is not None:
            self.log.bar.n = round(100 * progress, 1)
            self.log.bar.refresh()

    def write(self, run, epochs: float, lr: float, out: dict, extra: dict) -> None:
        extra = {**({"overflows": self.overflows} if self.overflows else {}), **extra}
        rec = dict(step=run.step, epoch=round(epochs, 3), loss=self.loss / self.steps, lr=lr, gnorm=out["gnorm"],
                   gnorm_enc=out["gnorm_enc"], gnorm_dec=out["gnorm_dec"],
                   tok_per_s=self.tokens / max(time.time() - self.started, 1e-9),
                   pad=self.padding / max(self.cells, 1), peak_gb=peak_memory_gb(self.device_type),
                   minutes=run.minutes, progress=round(self.progress, 4), **extra)
        self.log.record("train", f"step {run.step:>6} | epoch {epochs:6.2f} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                        f"gnorm {out['gnorm']:.2f} (enc {out['gnorm_enc']:.2f} dec {out['gnorm_dec']:.2f}) | "
                        f"{rec['tok_per_s']:,.0f} tok/s | pad {rec['pad']:.1%} | peak {rec['peak_gb']:.2f} GB | "
                        f"{run.minutes:.1f} min"
                        + printable(extra, " | "), **rec)
        if self.checks is not None:
            self.checks.at_log_line(run.step, lr)
        self.restart()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation) does not count against tokens/s."""
        started = time.time()
        yield
        self.started += time.time() - started

    def close(self) -> None:
        if self.log.bar is not None:
            self.log.bar.close()


def peak_memory_gb(device_type: str) -> float:
    """This process's peak memory so far, in GB: the GPU allocator's on CUDA, the resident set on a CPU."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


class SpikeWatch:
    """Feed it each step's loss; it returns the running mean the loss jumped above `factor` times
    (a spike), else None. The mean is exponential (~100 steps); the first 50 steps only build it;
    + 0.1 so that overfit mode's near-zero losses do not count."""

    def __init__(self, factor: float, warmup: int = 50, decay: float = 0.99):
        self.factor, self.warmup, self.decay = factor, warmup, decay
        self.mean, self.seen = 0.0, 0

    def __call__(self, loss: float) -> float | None:
        spike = self.factor > 0 and self.seen >= self.warmup and loss > self.factor * self.mean + 0.1
        if not spike:              # a spike does not drag the mean up with it
            self.seen += 1
            weight = min(self.decay, 1 - 1 / self.seen)      # a plain average until ~100 steps
            self.mean = weight * self.mean + (1 - weight) * loss
        return self.mean if spike else None
