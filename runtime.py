"""
Where a run executes: the device, the precision, and (under torchrun) the other processes.
Every script calls `setup` once and passes the result along; nothing else reads the knobs.

    rt = setup(device="auto", dtype="auto")
    with rt.amp:                          # bf16 / fp16 autocast, or nothing for fp32
        logits = model(*rt.to_device(src, tgt_in))

device 'auto' is the GPU when there is one, else the CPU. dtype 'auto' is bf16 on CPUs (1.7x
fp32 on the AMX units of the CPU this project was measured on; on a CPU without AVX-512 BF16 or
AMX, try --dtype=float32) and on GPUs of compute capability 8.0 and later, and fp16 with loss
scaling on older GPUs (T4, V100), which emulate bf16 slowly. fp16 also runs on a CPU, slowly,
which is how the tests exercise loss scaling. Under torchrun each process takes the GPU of its
LOCAL_RANK and joins a process group (NCCL on GPUs, gloo on CPUs).
Leaves out: Apple MPS, TPUs, model or pipeline parallelism.
"""

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from configurator import ConfigError


@dataclass
class Placement:
    """Which device this process uses and which process it is."""
    device: str             # 'cpu', 'cuda', 'cuda:3'
    rank: int = 0           # this process among all processes (0 = the one that logs and saves)
    local_rank: int = 0     # this process among those on its machine (picks its GPU)
    world_size: int = 1     # processes in the run
    backend: str = ""       # process-group backend: 'nccl' on GPUs, 'gloo' on CPUs, '' for one process


def place(device: str, env: dict, n_gpus: int) -> Placement:
    """Resolve the device knob for this process. A pure function of the knob, the environment
    torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE) and the number of visible GPUs, so that tests
    can call it with a fake environment.

        place('auto', {}, 0)                                        -> cpu, one process
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


def pick_dtype(dtype: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """Resolve the dtype knob: 'auto' -> 'bfloat16' on CPUs and on GPUs of compute capability
    8.0+ (A100, H100, RTX 30xx/40xx), 'float16' on older GPUs (T4 is 7.5, V100 7.0). Their
    is_bf16_supported() says yes, but they run bf16 by emulation, far slower than fp16."""
    if dtype == "auto":
        if device_type == "cpu" or (capability is not None and capability >= (8, 0)):
            return "bfloat16"
        return "float16"
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
        """fp16 has a narrow range: the scaler multiplies the loss so that small gradients do not
        underflow, and skips the steps whose scaled gradients overflowed. bf16 and fp32 need none."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == "float16" else None

    def to_device(self, *tensors: torch.Tensor) -> tuple:
        """Copy CPU tensors to the run's device; on a GPU through pinned memory, without
        waiting for the copy (the GPU orders it before the kernels that read it)."""
        if self.device_type == "cpu":
            return tensors
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes, in place (one process: unchanged). With NCCL the tensor
        must live on the GPU; no host synchronisation happens here."""
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def agree(self, minutes: float, stop: bool) -> tuple[float, bool]:
        """Process 0's clock and any process's stop request, the same on every process: each
        process decides to stop, and sets the learning rate of a time-budgeted schedule, from
        these values, so no process can leave while another waits for it in a collective."""
        if self.world_size == 1:
            return minutes, stop
        shared = torch.tensor([minutes if self.master else 0.0, float(stop)], dtype=torch.float64,
                              device=self.device)
        minutes, stops = self.all_sum(shared).tolist()
        return minutes, stops > 0

    def from_master(self, values: list[float]) -> list[float]:
        """Process 0's values on every process (one broadcast; the others wait for process 0)."""
        if self.world_size == 1:
            return values
        shared = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0)
        return shared.tolist()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


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


def setup(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Decide device and precision for this process and, under torchrun, join the process group."""
    p = place(device, dict(os.environ), torch.cuda.device_count())
    capability = None
    if p.device.startswith("cuda"):
        torch.cuda.set_device(p.device if ":" in p.device else 0)   # before NCCL: it uses the current device
        capability = torch.cuda.get_device_capability()
    if p.world_size > 1 and not dist.is_initialized():
        # the other processes wait in a collective while process 0 validates and saves: NCCL's
        # default of 10 minutes could end a run whose validation (a beam, a large split) takes longer
        dist.init_process_group(p.backend, timeout=datetime.timedelta(minutes=60))
    return Runtime(p.device, pick_dtype(dtype, p.device.split(":")[0], capability), p.rank, p.world_size)
