"""
The plumbing every script shares (nanochat's common.py idea): where a run executes (device,
precision, the processes of torchrun), its checkpoint files, and what it reports while it runs.

    rt = setup(device="auto", dtype="auto")      # the GPU if there is one; bf16 where the hardware has it
    with rt.amp:                                 # autocast in the run's precision (nothing for fp32)
        logits = model(*rt.to_device(src, tgt_in))
    save_checkpoint(path, state)                 # atomic: the previous file survives a crash
    model, src_tok, tgt_tok = model_from_checkpoint(load_checkpoint(path))

Leaves out: Apple MPS, TPUs, model or pipeline parallelism.
"""

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from configurator import ConfigError
from data import DataConfig, load_data
from decoding import evaluate
from gates import attach_gates, gated_types
from model_rnn import RNNConfig, Seq2SeqRNN
from model_transformer import Transformer, TransformerConfig
from speed import speed_up
from tokenizer import pair_from_state, pair_state

try:
    import fcntl
except ImportError:     # Windows: no lock against a second live run; the rest of claim_run_dir holds
    fcntl = None

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


def pick_dtype(dtype: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """'auto' -> 'bfloat16' on CPUs and on GPUs of compute capability 8.0+ (A100, H100), 'float16'
    (with loss scaling) on older GPUs (T4, V100), which would emulate bf16 slowly."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cpu" or (capability or (0, 0)) >= (8, 0) else "float16"
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

    def agree(self, minutes: float, stop: bool) -> tuple[float, bool]:
        """Process 0's clock and any process's stop request, the same on every process, so that all
        stop at the same step (none leaves while another waits for it in a collective)."""
        if self.world_size == 1:
            return minutes, stop
        shared = torch.tensor([minutes if self.master else 0.0, float(stop)], dtype=torch.float64, device=self.device)
        minutes, stops = self.all_sum(shared).tolist()
        return minutes, stops > 0

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
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device_type == "cuda" else None, find_unused_parameters=pruned)

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
    return Runtime(p.device, pick_dtype(dtype, p.device.split(":")[0], capability), p.rank, p.world_size)


# -----------------------------------------------------------------------------
# a run folder belongs to one run

RUN_FILES = ("ckpt.pt", "best.pt", "avg.pt", "pruned.pt", "log.jsonl", "plots.png", "snapshots", "finetune",
             "prune_report.json", "test_translations.txt", "gates_final.png", "gates.gif", "heads_vs_step.png")
CHECKPOINTS = RUN_FILES[:4]     # a folder holding one of these holds a run that cost time to train
held_dirs = {}                  # run folder -> its open lock file, held until this process ends


def claim_run_dir(out_dir: str, new_run: bool, overwrite: bool = False, hint: str = "", start: str = "") -> None:
    """Make out_dir this process's run folder, or refuse with one line saying why.

    A lock (flock on out_dir/run.lock) refuses a second run in the folder while the first is alive;
    the kernel releases it when its process ends, even by SIGKILL, so a killed run never blocks its
    resume. A new run refuses a folder that holds another run's checkpoint unless overwrite, and
    then deletes all of that run's files (RUN_FILES, nothing else): the folder never mixes two
    runs. hint: a way on to name first (e.g. "continue it with --init_from=resume, "); start: the
    checkpoint the new run starts from, which must not be one of the files it replaces."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create out_dir '{out_dir}': {e.strerror or e}. Choose another --out_dir.") from None
    key = os.path.realpath(out_dir)
    if fcntl is not None and key not in held_dirs:
        lock = open(os.path.join(out_dir, "run.lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "?"
            lock.close()
            raise ConfigError(f"another run (process {pid}) is writing into {out_dir}: wait for it to end, "
                              "or choose another --out_dir") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        held_dirs[key] = lock
    if not new_run:
        return
    if any(os.path.exists(os.path.join(out_dir, name)) for name in CHECKPOINTS) and not overwrite:
        raise ConfigError(f"{out_dir} holds {what_run_dir_holds(out_dir)}: {hint}choose another --out_dir, or "
                          "replace it with --overwrite=True")
    if start and os.path.relpath(os.path.realpath(start), key).split(os.sep)[0] in RUN_FILES:
        raise ConfigError(f"--overwrite=True would delete {start}, the checkpoint this run starts from: copy it "
                          "out of the folder first, or choose another --out_dir")
    for name in RUN_FILES:                      # also the leftovers of a run killed before its first checkpoint
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def what_run_dir_holds(out_dir: str) -> str:
    """'a run at step N (best validation BLEU B)' from its ckpt.pt, else the checkpoints' names."""
    names = [n for n in CHECKPOINTS if os.path.exists(os.path.join(out_dir, n))]
    try:
        state = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        return f"a run at step {state['step']} (best validation BLEU {state['best_bleu']:.2f}; {', '.join(names)})"
    except (ConfigError, KeyError):     # no ckpt.pt, or not a readable one: name what is there
        return f"another run's {', '.join(names)}"


def resumed_config(defaults: dict, given: dict, resume: dict, out_dir: str) -> dict:
    """A resumed run goes on with its own configuration, in out_dir, the folder it was read from
    (not the one it was trained in, should the folder have moved); its limits, intervals, device and
    precision may be changed by naming them (e.g. --max_minutes=60 to extend it). defaults: every
    knob of train.py with its default; given: the knobs named on the command line."""
    may_change = ("max_iters", "max_epochs", "max_minutes", "patience", "eval_interval", "log_interval", "device",
                  "dtype", "plot")
    own = {k: v for k, v in resume["train_config"].items() if k in defaults}   # (not knobs since removed)
    ignored = [k for k, v in given.items()
               if k not in (*may_change, "init_from", "out_dir") and own.get(k, defaults[k]) != v]
    if ignored:
        print(f"resuming with the run's own configuration: ignoring {', '.join(ignored)} "
              f"(a resumed run may change only {', '.join(may_change)})")
    return {**defaults, **own, **{k: v for k, v in given.items() if k in may_change}, "init_from": "resume",
            "out_dir": out_dir}


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
# checkpoints: one self-contained dict per file, enough to translate, prune or resume with nothing else:
#   kind, model_config   which model class and its constructor arguments (per-layer heads after pruning)
#   model                the weights;  tokenizers: their merges or characters (no side files)
#   data_config, train_config   how the data was prepared, every training knob
#   step, epoch, ...     where the run stands (train.RunState; the learning rate is a function of it)
#   optimizer, scaler    optimizer moments, fp16 loss scale (random draws are seeded per step, so no
#                        generator state is needed to resume exactly)
#   gated                attention types carrying L0 gates (prune.py's checkpoints while gating)

MODELS = {"transformer": (Transformer, TransformerConfig), "rnn": (Seq2SeqRNN, RNNConfig)}   # kind -> classes


def checkpoint_of(model, src_tok, tgt_tok, train_config: dict, **training_state) -> dict:
    gated = gated_types(model)
    return {"kind": model.kind, "model_config": asdict(model.cfg), "model": model.state_dict(),
            "tokenizers": pair_state(src_tok, tgt_tok), "data_config": asdict(DataConfig.of(train_config)),
            "train_config": train_config, **({"gated": gated} if gated else {}), **training_state}


def save_checkpoint(path: str, state: dict) -> None:
    """Write a temporary file, flush it to the disk, then rename it over `path`: a crash or a full
    disk mid-write never destroys the previous file, and a file that exists is complete."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ConfigError(f"could not write checkpoint {path}: {e.strerror or e}. The previous checkpoint "
                          "is untouched; free disk space or choose another --out_dir.") from None


def load_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True: tensors and plain data, never code."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint '{path}' does not exist: train one with train.py or pass --ckpt=PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise ConfigError(f"checkpoint '{path}' cannot be loaded safely ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}). It is truncated, corrupt, or not a checkpoint "
                          "of this project (only tensors and plain data are accepted, never code).") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        raise ConfigError(f"'{path}' is not a checkpoint of this project (no model kind or weights)")
    return ckpt


def model_of(kind: str, model_config: dict, verbose: bool = False):
    """A new model of a checkpoint's kind and model config, with speed.py's stand-ins; in a pruned
    Transformer, what an attention with no head left cannot learn is frozen (freeze_pruned_away)."""
    model_class, config_class = MODELS[kind]
    with warnings.catch_warnings():     # empty weights (an attention with no head left): a no-op to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = speed_up(model_class(config_class(**model_config), verbose))
    if kind == "transformer":
        freeze_pruned_away(model)
    return model


def freeze_pruned_away(model) -> None:
    """An attention whose heads were all pruned adds its output bias alone: its empty weights, and
    with pre-LN the LayerNorm before it, get no gradient. They are frozen, so that the optimizer
    holds no state for them (the optimizer states of pruned runs stay the same shape) and DDP does
    not wait for their gradients."""
    pairs = [(layer.self_attn, layer.res_attn) for layer in model.encoder]
    pairs += [pair for layer in model.decoder for pair in ((layer.self_attn, layer.res_self),
                                                            (layer.cross_attn, layer.res_cross))]
    for attn, residual in pairs:
        if attn.n_head == 0:
            for p in attn.parameters():
                p.requires_grad_(p.numel() > 0)                # out_proj's bias still learns
            residual.norm.requires_grad_(not residual.pre_norm)


def model_from_checkpoint(ckpt: dict, verbose: bool = False):
    """(model with its weights and speed.py's stand-ins, source tokenizer, target tokenizer) from a checkpoint."""
    model = model_of(ckpt["kind"], ckpt["model_config"], verbose)
    if ckpt.get("gated"):
        attach_gates(model, ckpt["gated"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"the checkpoint's weights do not fit its model config: {detail}") from None
    src_tok, tgt_tok = pair_from_state(ckpt["tokenizers"])
    cfg = ckpt["model_config"]
    if (src_tok.vocab_size, tgt_tok.vocab_size) != (cfg["src_vocab"], cfg["tgt_vocab"]):
        raise ConfigError(f"the checkpoint's tokenizer does not match its model: vocabularies of "
                          f"{src_tok.vocab_size}/{tgt_tok.vocab_size} tokens, embeddings for "
                          f"{cfg['src_vocab']}/{cfg['tgt_vocab']} (source/target)")
    return model, src_tok, tgt_tok


def data_of_checkpoint(ckpt: dict, dataset: str = "", verbose: bool = True):
    """The tokenized splits a checkpoint was trained on; `dataset` replaces their location (a local
    folder when the original was a hub name or another machine's path)."""
    cfg = DataConfig.of(ckpt["data_config"])
    cfg.dataset = dataset or cfg.dataset
    return load_data(cfg, verbose=verbose)


def keep_snapshot(out_dir: str, checkpoint: dict, step: int, keep: int) -> None:
    """Write the weights to out_dir/snapshots/step_<step>.pt for averaging; delete all but the last
    `keep`, and any of later steps (left by a killed run that is now resumed from an earlier step)."""
    os.makedirs(os.path.join(out_dir, "snapshots"), exist_ok=True)
    save_checkpoint(os.path.join(out_dir, "snapshots", f"step_{step:07d}.pt"), checkpoint)
    up_to_now = [path for s, path in snapshots(out_dir) if s <= step]
    for path in up_to_now[:-keep] + [path for s, path in snapshots(out_dir) if s > step]:
        os.remove(path)


def snapshots(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of a run's snapshots, oldest first."""
    folder = os.path.join(out_dir, "snapshots")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(int(n[5:-3]), os.path.join(folder, n)) for n in names
            if re.fullmatch(r"step_\d+\.pt", n)]                # not a .tmp left by a killed write


def average_checkpoints(paths: list[str]) -> dict:
    """The first checkpoint with its weights replaced by the mean of every checkpoint's weights (no
    optimizer state). The last checkpoints of a run sit around one minimum, each pushed off it by
    the noise of its last updates; their mean sits closer (Vaswani et al. 2017 average the last
    5-20; Izmailov et al. 2018 explain why). They must share one model config."""
    if not paths:
        raise ConfigError("no checkpoints to average")
    first = last = load_checkpoint(paths[0])
    total = {k: v.double() for k, v in first["model"].items() if v.is_floating_point()}
    for path in paths[1:]:
        last = load_checkpoint(path)
        if last["model_config"] != first["model_config"] or last["kind"] != first["kind"]:
            raise ConfigError(f"'{path}' holds another model than '{paths[0]}': only checkpoints of one run average")
        for k in total:
            total[k] += last["model"][k].double()
    weights = {k: (total[k] / len(paths)).to(v.dtype) if k in total else v for k, v in first["model"].items()}
    keep = ("kind", "model_config", "tokenizers", "data_config", "train_config", "gated")
    return {**{k: first[k] for k in keep if k in first}, "model": weights, "step": last.get("step", 0),
            "averaged": list(paths)}


def take_snapshot(model, data, cfg: dict, step: int) -> None:
    """The weights at `step` into the run's snapshots for averaging, the last cfg["average_last"] kept."""
    keep_snapshot(cfg["out_dir"], checkpoint_of(model, data.src_tok, data.tgt_tok, cfg, step=step), step,
                  cfg["average_last"])


def write_average(model, data, cfg: dict, rt: Runtime, log, step: int) -> None:
    """avg.pt at the end of a run: the mean weights of its last average_last snapshots (the final
    weights, at `step`, the last of them), validated like the run itself."""
    if step % (cfg["average_every"] or cfg["eval_interval"]):
        take_snapshot(model, data, cfg, step)
    steps, paths = zip(*snapshots(cfg["out_dir"])[-cfg["average_last"]:])
    averaged = average_checkpoints(list(paths))
    save_checkpoint(os.path.join(cfg["out_dir"], "avg.pt"), averaged)
    ev = evaluate(model_from_checkpoint(averaged)[0].to(rt.device), data, cfg["batch_tokens"], rt.device, rt.amp,
                  n_sentences=cfg["eval_sentences"])
    log.record("average", f"avg.pt, the mean of {len(paths)} snapshots (steps {steps[0]}-{steps[-1]}): val loss "
               f"{ev['loss']:.3f}, BLEU {ev['bleu']:.2f} (lower-cased {ev['bleu_lc']:.2f}), chrF {ev['chrf']:.2f}",
               step=steps[-1], snapshots=len(paths), val_loss=ev["loss"], bleu=ev["bleu"], bleu_lc=ev["bleu_lc"],
               chrf=ev["chrf"])


# -----------------------------------------------------------------------------
# what a run reports

class RunLog:
    """Prints one line per record and appends the record to out_dir/log.jsonl.

    resume_step: the step of the checkpoint a run resumes from. The killed run logged steps after
    it (and maybe half a line); they will be run again, so they are dropped and every step is
    logged once. None: a new run, which starts a new log."""

    def __init__(self, out_dir: str, enabled: bool, bar=None, resume_step: int | None = None):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled, self.bar = enabled, bar
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
        """Print `line`; append {"kind": kind, **values} to log.jsonl (lists and dicts go there only)."""
        self.say(line)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"kind": kind, **values}) + "\n")


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
    step's gradient norms (all, encoder side, decoder side), target tokens/s, padding, fp16
    overflows, and what the run adds (prune.py: its gates); the progress bar; loss spikes, a step
    whose loss exceeds 2x the running mean of those before it (SpikeWatch). One spike is noise;
    spikes that repeat, or a loss that stays up after one, call for a lower learning rate, more
    warm-up or clipping."""

    def __init__(self, log: RunLog, src_pad: int, tgt_pad: int):
        self.log, self.src_pad, self.tgt_pad, self.spikes = log, src_pad, tgt_pad, SpikeWatch(2.0)
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
            self.log.say(f"warning: loss spike at step {run.step}: {out['loss']:.3f}, running mean {running:.3f} "
                         f"(lr {lr:.2e}, gradient norm {out['gnorm']:.2f}). If it repeats or the loss stays "
                         "up: lower learning_rate, longer warmup_frac, grad_clip=1.")
        if self.log.bar is not None:
            self.log.bar.n = round(100 * progress, 1)
            self.log.bar.refresh()

    def write(self, run, epochs: float, lr: float, out: dict, extra: dict) -> None:
        extra = {**({"overflows": self.overflows} if self.overflows else {}), **extra}
        rec = dict(step=run.step, epoch=round(epochs, 3), loss=self.loss / self.steps, lr=lr, gnorm=out["gnorm"],
                   gnorm_enc=out["gnorm_enc"], gnorm_dec=out["gnorm_dec"],
                   tok_per_s=self.tokens / max(time.time() - self.started, 1e-9),
                   pad=self.padding / max(self.cells, 1), minutes=run.minutes, **extra)
        self.log.record("train", f"step {run.step:>6} | epoch {epochs:6.2f} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                        f"gnorm {out['gnorm']:.2f} (enc {out['gnorm_enc']:.2f} dec {out['gnorm_dec']:.2f}) | "
                        f"{rec['tok_per_s']:,.0f} tok/s | pad {rec['pad']:.1%} | {run.minutes:.1f} min"
                        + printable(extra, " | "), **rec)
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
