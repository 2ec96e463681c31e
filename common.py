"""
The plumbing every script shares (nanochat's common.py idea): where a run executes (device,
precision, the processes of torchrun), what it does on a signal, and what it reports while it
runs (the log line, log.jsonl, plots). What it leaves on disk: checkpoint.py.

    rt = setup(device="auto", dtype="auto")      # the GPU if there is one; bf16 where the hardware has it
    with rt.amp:                                 # autocast in the run's precision (nothing for fp32)
        logits = model(*rt.to_device(src, tgt_in))

Leaves out: Apple MPS, TPUs, model or pipeline parallelism.
"""

import contextlib
import datetime
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from configurator import ConfigError
from diagnostics import StepChecks, Symptoms

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


@dataclass
class Runtime:
    """The device, precision and processes of a run, as `setup` decided them."""
    device: str
    dtype: str              # 'float32', 'bfloat16' or 'float16'
    rank: int = 0
    world_size: int = 1

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def master(self) -> bool:
        """Process 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def amp(self):
        """The autocast context of the run's precision (nothing for fp32)."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's narrow range needs loss scaling (small gradients would underflow); bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == "float16" else None

    def to_device(self, *tensors: torch.Tensor) -> tuple:
        """CPU tensors to the run's device; on a GPU through pinned memory, without waiting."""
        if self.device_type == "cpu":
            return tensors
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes, in place (one process: unchanged)."""
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def agree(self, clocks: list[float], stop: bool) -> tuple[list[float], bool]:
        """Process 0's clocks and any process's stop request, the same on every process, so that all
        follow one schedule and stop at the same step (none leaves while another waits for it in a
        collective)."""
        if self.world_size == 1:
            return clocks, stop
        shared = torch.tensor([*(c if self.master else 0.0 for c in clocks), float(stop)], dtype=torch.float64,
                              device=self.device)
        *clocks, stops = self.all_sum(shared).tolist()
        return clocks, stops > 0

    def from_master(self, values: list[float]) -> list[float]:
        """Process 0's values on every process."""
        if self.world_size == 1:
            return values
        shared = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0)
        return shared.tolist()

    def wrap(self, model):
        """The model in DistributedDataParallel under torchrun; as it is for one process."""
        if self.world_size == 1:
            return model
        # a pruned model can leave whole parts without gradient (the encoder, if no cross-attention
        # head is left): DDP must then look for unused parameters at every step
        pruned = any(p.numel() == 0 for p in model.parameters())
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device_type == "cuda" else None, find_unused_parameters=pruned)
        # DDP would re-send every buffer from process 0 before each forward; the only one here is the
        # Transformer's table of positions (8 MiB at D=512), the same everywhere. (Set after building:
        # PyTorch 2.13 renames the argument, and the attribute works in every version.)
        ddp.broadcast_buffers = False
        return ddp

    @contextlib.contextmanager
    def master_first(self):
        """Process 0 runs the block first and the others after it: process 0 learns the tokenizer and
        writes the data cache, the others read that cache instead of all writing the same file at once."""
        if self.world_size > 1 and not self.master:
            dist.barrier()
        yield
        if self.world_size > 1 and self.master:
            dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Decide device and precision for this process and, under torchrun, join the process group."""
    p = place(device, dict(os.environ), torch.cuda.device_count())
    capability = None
    if p.device.startswith("cuda"):
        torch.cuda.set_device(p.device if ":" in p.device else 0)   # before NCCL: it uses the current device
        capability = torch.cuda.get_device_capability()
    if p.world_size > 1 and not dist.is_initialized():
        # the others wait in a collective while process 0 validates: NCCL's default 10 minutes can be too short
        dist.init_process_group(p.backend, timeout=datetime.timedelta(minutes=60))
    cpu_bf16 = p.device != "cpu" or cpu_has_bf16()
    rt = Runtime(p.device, pick_dtype(dtype, p.device.split(":")[0], capability, cpu_bf16), p.rank, p.world_size)
    if rt.device_type == "cpu" and rt.dtype != "float32" and not cpu_bf16 and rt.master:
        print(f"warning: dtype={rt.dtype} on a CPU without bf16/fp16 instructions (AVX512-BF16, AMX): matrix "
              "products fall back to a slow loop (40x slower than float32 on an AVX2 CPU); use --dtype=float32")
    return rt

class StopSignals:
    """While training runs, SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) only note their
    name: the loop finishes the step in flight, saves and exits, instead of losing the run."""

    def __init__(self):
        self.received, self.previous = "", {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):           # not in the main thread: keep the default
                self.previous[sig] = signal.signal(sig, self.note)
        return self

    def note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

# -----------------------------------------------------------------------------
# what a run reports

class RunLog:
    """Prints one line per record and appends the record to out_dir/log.jsonl.

    resume_step: the step of the checkpoint a run resumes from. The killed run logged steps after
    it (and maybe half a line); they will be run again, so they are dropped and every step is
    logged once. None: a new run, which starts a new log."""

    def __init__(self, out_dir: str, enabled: bool, bar=None, resume_step: int | None = None):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled, self.bar, self.symptoms = enabled, bar, Symptoms()
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
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def record(self, kind: str, line: str, **values) -> None:
        """Print `line`; append {"kind": kind, **values} to log.jsonl (lists and dicts go there only);
        then the warnings that the record calls for (Symptoms)."""
        self.say(line)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"kind": kind, **values}) + "\n")
            for name, text in self.symptoms(kind, values):
                self.warn(name, text, values.get("step", 0))

    def warn(self, name: str, text: str, step: int = 0) -> None:
        """A diagnostic: "warning: TEXT" in the log, {"kind": "warning", "name": NAME, ...} in log.jsonl."""
        self.record("warning", f"warning: {text}", name=name, step=step, text=text)


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
    step's gradient norms (all, encoder side, decoder side), target tokens/s, padding, peak
    memory, fp16 overflows, and what the run adds (prune.py: its gates); the progress bar; loss spikes, a step
    whose loss exceeds 2x the running mean of those before it (SpikeWatch). One spike is noise;
    spikes that repeat, or a loss that stays up after one, call for a lower learning rate, more
    warm-up or clipping. Given the model (and overfit = overfit_batches), it has StepChecks look
    at the weights at each log line, and at each batch in overfit mode (diagnostics.py)."""

    def __init__(self, log: RunLog, src_pad: int, tgt_pad: int, device_type: str = "cpu", model=None,
                 overfit: int = 0):
        self.log, self.src_pad, self.tgt_pad, self.spikes = log, src_pad, tgt_pad, SpikeWatch(2.0)
        self.device_type, self.overfit = device_type, overfit
        self.checks = StepChecks(log, model if log.enabled else None)
        self.restart()

    def restart(self) -> None:
        self.steps = self.tokens = self.padding = self.cells = self.overflows = 0
        self.loss, self.started = 0.0, time.time()

    def add(self, run, lr: float, out: dict, batches: list, progress: float) -> None:
        """Count one step: its report from train.train_step and its (CPU) batches (src, tgt_in, tgt_out)."""
        self.steps, self.loss, self.tokens = self.steps + 1, self.loss + out["loss"], self.tokens + out["tokens"]
        self.overflows += out["update"] == "overflow"
        for src, tgt_in, _ in batches:
            self.padding += int((src == self.src_pad).sum() + (tgt_in == self.tgt_pad).sum())
            self.cells += src.numel() + tgt_in.numel()
        running = self.spikes(out["loss"])
        if running is not None:
            self.log.warn("loss_spike", f"loss spike at step {run.step}: {out['loss']:.3f}, running mean {running:.3f} "
                          f"(lr {lr:.2e}, gradient norm {out['gnorm']:.2f}). If it repeats or the loss stays "
                          "up: lower learning_rate, longer warmup_frac, grad_clip=1.", run.step)
        if self.overfit:
            self.checks.same_batches(run, batches)
        if self.log.bar is not None:
            self.log.bar.n = round(100 * progress, 1)
            self.log.bar.refresh()

    def write(self, run, epochs: float, lr: float, out: dict, extra: dict) -> None:
        extra = {**({"overflows": self.overflows} if self.overflows else {}), **extra}
        rec = dict(step=run.step, epoch=round(epochs, 3), loss=self.loss / self.steps, lr=lr, gnorm=out["gnorm"],
                   gnorm_enc=out["gnorm_enc"], gnorm_dec=out["gnorm_dec"],
                   tok_per_s=self.tokens / max(time.time() - self.started, 1e-9),
                   pad=self.padding / max(self.cells, 1), peak_gb=peak_memory_gb(self.device_type),
                   minutes=run.minutes, **extra)
        self.log.record("train", f"step {run.step:>6} | epoch {epochs:6.2f} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                        f"gnorm {out['gnorm']:.2f} (enc {out['gnorm_enc']:.2f} dec {out['gnorm_dec']:.2f}) | "
                        f"{rec['tok_per_s']:,.0f} tok/s | pad {rec['pad']:.1%} | peak {rec['peak_gb']:.2f} GB | "
                        f"{run.minutes:.1f} min"
                        + printable(extra, " | "), **rec)
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
