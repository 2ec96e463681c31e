"""
What a run needs beyond one process training in fp32 or bf16: several processes under torchrun
(data parallelism), fp16's loss scaling, a wall-clock budget that the learning rate follows,
Ctrl-C and SIGTERM, exact resume. Read train.py first: its loop is the plain one, and it reaches
all of this through `rt` (a Runtime) and a RunClock. For one process in fp32 or bf16 each call
is the plain line beside it:

    rt.backward(loss)                      loss.backward()     fp16: the loss scaled up first
    rt.finish_backward(model, optimizer)   nothing             processes: gradients averaged; fp16: unscaled
    rt.step(optimizer)                     optimizer.step()    fp16: through the scaler
    rt.skip(optimizer, loss)               'skipped'           fp16: an 'overflow', the scaler's routine
    rt.mean(x)                             x                   processes: the mean over all of them
    rt.share(batches)                      batches             processes: process r takes batches r, r+N, ...
    rt.start(optimizer, cfg, resume, RunState)    RunState()   resume: the checkpoint's RunState and optimizer
    clock.tick(run)                        run.minutes moved   the schedule's clock under max_minutes; signals
    count_bad_step(run, lr, out, log)      a warning           ten in a row: stop the run (Diverged)

Leaves out: model parallelism, overlapping the gradients' exchange with backward (as DDP does).
"""

import contextlib
import datetime
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from batching import TrainBatches
from common import cpu_has_bf16, pick_dtype, place
from configurator import ConfigError


@dataclass
class Runtime:
    """The device, precision and processes of a run, as `setup` decided them."""
    device: str
    dtype: str              # 'float32', 'bfloat16' or 'float16'
    rank: int = 0
    world_size: int = 1
    scaler: torch.amp.GradScaler | None = None     # fp16's loss scaler, one per training run (start)

    def __str__(self) -> str:
        return f"device {self.device}, dtype {self.dtype}, {self.world_size} process(es)"

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

    def to_device(self, *tensors: torch.Tensor) -> tuple:
        """CPU tensors to the run's device; on a GPU through pinned memory, without waiting."""
        if self.device_type == "cpu":
            return tensors
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """t's mean over the processes. Each divides its loss by the mean target-token count, and the
        gradients are averaged: (1/N) sum_r loss_r / mean count = (every loss) / (all target tokens)."""
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(); fp16 scales the loss up first, so that small gradients do not round to 0."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def finish_backward(self, model, optimizer) -> None:
        """After a step's last backward: the gradients averaged over the processes, fp16's scale divided out."""
        if self.world_size > 1:
            average_gradients(model, self.world_size)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)     # records whether any gradient is inf/NaN (an overflow)

    def step(self, optimizer) -> str:
        """optimizer.step() for finite gradients: 'done'. fp16: through the scaler, which may raise its scale."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        return "done"

    def skip(self, optimizer, loss: float) -> str:
        """No update, for a non-finite loss or gradient: 'skipped', a bad step. In fp16, non-finite gradients
        of a finite loss are an 'overflow' of the scaled loss, routine while the scaler finds its scale
        (it halves), unless the scale is already below 1 (they overflow even scaled down)."""
        if self.scaler is None:
            return "skipped"
        if math.isfinite(loss):
            self.scaler.step(optimizer)         # sees the overflow that unscale_ recorded: no update
        self.scaler.update()                    # the scale halves
        return "overflow" if math.isfinite(loss) and self.scaler.get_scale() >= 1.0 else "skipped"

    def share(self, batches: TrainBatches) -> TrainBatches:
        """This process's share of the training batches (one process: all of them)."""
        if self.world_size == 1:
            return batches
        return ShareOfBatches(batches.data, batches.batch_tokens, batches.seed, batches.overfit, self.rank,
                              self.world_size)

    def start(self, optimizer, cfg: dict, resume: dict | None, RunState):
        """Make this run's fp16 scaler; return the RunState (train.py's) it starts from: step 0, or where the
        checkpoint `resume` stopped, its optimizer moments and fp16 scale loaded. That is all exact resume
        needs: the batch order is a function of (seed, epoch), a step's random draws of (seed, process,
        step), the learning rate of the RunState."""
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype == "float16" else None
        if resume is None:
            return RunState()
        if resume.get("world_size", 1) != self.world_size:
            raise ConfigError(f"the run in {cfg['out_dir']} trained with {resume.get('world_size', 1)} process(es), and "
                              f"{self.world_size} would take other batches: resume with as many, or start a new run "
                              f"from its checkpoint with --init_from={os.path.join(cfg['out_dir'], 'ckpt.pt')}")
        try:
            optimizer.load_state_dict(resume["optimizer"])
        except ValueError as e:
            raise ConfigError(f"the checkpoint's optimizer state does not fit this model's parameters ({e}); "
                              "start a new run from it instead: --init_from=PATH") from None
        if self.scaler is not None and resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        run = RunState(**{f.name: resume[f.name] for f in fields(RunState) if f.name in resume})
        if "time_progress" not in resume or resume["train_config"]["max_minutes"] != cfg["max_minutes"]:
            # a checkpoint from before the schedule's clock, or a new budget (--max_minutes=60 to extend
            # a run): the schedule goes on as if the run had been planned for this budget from the start
            run.train_minutes = resume.get("train_minutes", run.minutes)
            run.time_progress = min(1.0, run.minutes / cfg["max_minutes"]) if cfg["max_minutes"] else 0.0
        return run

    def state(self) -> dict:
        """What a checkpoint keeps of this for resume: the fp16 scale, the processes."""
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "world_size": self.world_size}

    @contextlib.contextmanager
    def master_first(self):
        """Process 0 runs the block first (it writes the data cache), the others after it (they read it)."""
        if self.world_size > 1 and not self.master:
            dist.barrier()
        yield
        if self.world_size > 1 and self.master:
            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group, every process from a barrier: none closes its connections while
        another still waits on them."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run_process(main, *args) -> None:
    """Run main(*args); in a process of a torchrun run, then end the process at once with main's exit
    code, its output flushed, without the interpreter's teardown: in a few of the test suite's
    torchrun runs, process 0 was aborted there after the run had written everything (SIGABRT,
    "terminate called without an active exception": a C++ thread destroyed while it still ran).
    Nothing is lost: log.jsonl and the checkpoints are written and closed record by record, file by
    file, and TensorBoard's records flushed. On one process: main(*args), nothing more."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        main(*args)
        return
    try:
        main(*args)
        code = 0
    except SystemExit as e:                                 # (sys.exit(2) for bad input, 1 when diverged)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def average_gradients(model, world_size: int) -> None:
    """The gradients replaced by their mean over the processes: one all_reduce of them end to end. A
    parameter no process gave a gradient (in a pruned model, an encoder without cross-attention heads)
    keeps none, as on one process: one number per parameter, 1 where this process has one, says which."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel()) for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)])
    dist.all_reduce(flat)
    grads, has_grad = flat[:-len(params)].split([p.numel() for p in params]), flat[-len(params):].tolist()
    for p, g, some in zip(params, grads, has_grad):
        if some:
            p.grad = (g / world_size).view_as(p).to(p.dtype)


class ShareOfBatches(TrainBatches):
    """Process r of N takes batches r, r + N, ... of each epoch, all as many (overfit mode: the same ones)."""

    def __init__(self, data, batch_tokens: int, seed: int, overfit: int, rank: int, world_size: int):
        super().__init__(data, batch_tokens, seed, overfit)
        self.rank, self.world_size = rank, world_size

    def of_epoch(self, epoch: int) -> list:
        every = super().of_epoch(epoch)
        if self.overfit:
            return every
        return every[self.rank::self.world_size][:len(every) // self.world_size]


# -----------------------------------------------------------------------------
# bad steps

MAX_BAD_STEPS = 10       # a run stops after this many non-finite steps in a row


class Diverged(Exception):
    """MAX_BAD_STEPS non-finite steps in a row. Nothing is saved: the last checkpoint is the last good state."""


def count_bad_step(run, lr: float, out: dict, log) -> None:
    """A step skipped for a non-finite loss or gradient: warned about, counted in run.bad_steps; too many in a row
    raise Diverged."""
    run.bad_steps, step = run.bad_steps + 1, run.step + 1
    log.warn("non_finite", f"step {step}: non-finite loss or gradient, update skipped ({run.bad_steps} in a row)", step)
    if run.bad_steps >= MAX_BAD_STEPS:
        raise Diverged(f"{run.bad_steps} non-finite steps in a row at step {step} (lr {lr:.2e}, gradient "
                       f"norm {out['gnorm']}). Try a lower learning_rate, grad_clip=1, or dtype=float32.")


# -----------------------------------------------------------------------------
# the clock of a run: its minutes, the schedule's clock under max_minutes, the signals that stop it

class RunClock:
    """The loop's clock: clock.tick(run) at the top of every turn, `with clock.training():` around each
    step. While it runs, Ctrl-C (SIGINT) and SIGTERM (a scheduler's notice) only note their name: the
    loop finishes the step in flight, saves and exits. Every process follows process 0's clocks and
    stops when any was signalled (none leaves while another waits for it in a collective)."""

    def __init__(self, rt: Runtime, run, cfg: dict):
        self.rt, self.cfg, self.received, self.previous = rt, cfg, "", {}
        self.start, self.train_seconds = time.time() - 60 * run.minutes, 60 * run.train_minutes

    def __enter__(self) -> "RunClock":
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):           # not in the main thread: keep the default
                self.previous[sig] = signal.signal(sig, self.note)
        return self

    def note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def training(self):
        """Time spent inside counts as training time (the schedule's clock moves with it)."""
        started = time.time()
        yield
        self.train_seconds += time.time() - started

    def tick(self, run) -> str:
        """Move run.minutes, run.train_minutes, run.time_progress on; take process 0's best_bleu and
        evals_without_gain (its validation's); return 'received SIGINT' (or another signal), else ''."""
        values = [(time.time() - self.start) / 60, self.train_seconds / 60, run.best_bleu, run.evals_without_gain]
        signalled = self.received
        if self.rt.world_size > 1:
            shared = torch.tensor([*(v if self.rt.master else 0.0 for v in values), float(bool(signalled))],
                                  dtype=torch.float64, device=self.rt.device)
            dist.all_reduce(shared)
            *values, stops = shared.tolist()
            signalled = signalled or ("a signal (on another process)" if stops > 0 else "")
        minutes, train_minutes, run.best_bleu, evals = values
        run.evals_without_gain = int(evals)
        advance_clock(run, minutes, train_minutes, self.cfg)
        return f"received {signalled}" if signalled else ""


def advance_clock(run, minutes: float, train_minutes: float, cfg: dict) -> None:
    """Move the run's clocks on to `minutes` of wall-clock time, `train_minutes` of them spent in
    training steps. Under max_minutes the schedule's clock p moves with training time only: each
    call moves it by the share of the way still to go that this call's training time dt is of the
    training time still to come, R:

        p += (1 - p) * dt / (dt + R)
        R = (max_minutes - minutes - e * (step % N) / N) / (1 + e / (N * s))

    The minutes left, M = max_minutes - minutes, hold R minutes of training and the validations of its
    R / s steps (s: the mean step), one every N = eval_interval steps, each as long as the mean one so
    far (e): M = R + e * (step % N + R / s) / N, solved for R above. Without validations p = minutes /
    max_minutes: at 10.1 of 30 minutes, dt = 0.1 and R = 19.9: 10/30 -> 10.1/30. Between validations
    R falls as fast as training time passes; across one it stays: no step in the learning rate."""
    if cfg["max_minutes"]:
        N, evals = cfg["eval_interval"], run.step // cfg["eval_interval"]
        e = (minutes - train_minutes) / evals if evals else 0.0
        s = train_minutes / max(run.step, 1)
        left = (cfg["max_minutes"] - minutes - e * (run.step % N) / N) / (1 + e / (N * s) if e else 1.0)
        dt = train_minutes - run.train_minutes
        run.time_progress = min(1.0, run.time_progress + (1 - run.time_progress) * dt / max(dt + max(left, 0.0), 1e-9))
    run.minutes, run.train_minutes = minutes, train_minutes

