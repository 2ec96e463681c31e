"""
What a run leaves on disk, and how it is read back: a run folder belongs to one run
(claim_run_dir), checkpoints are self-contained dicts written atomically, a resumed run takes its
own configuration, and the last snapshots of a run average into avg.pt.

    claim_run_dir(out_dir, new_run=True)         # refuse another run's folder, or one in use
    save_checkpoint(path, state)                 # atomic: the previous file survives a crash
    model, src_tok, tgt_tok = model_from_checkpoint(load_checkpoint(path))

Leaves out: keeping checkpoints anywhere but a local folder, sharded checkpoints.
"""

import contextlib
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch

from configurator import ConfigError
from data import DataConfig
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
# a run folder belongs to one run

RUN_FILES = ("ckpt.pt", "best.pt", "avg.pt", "pruned.pt", "log.jsonl", "plots.png", "snapshots", "finetune",
             "prune_report.json", "test_translations.txt", "gates_final.png", "gates.gif", "heads_vs_step.png",
             "tensorboard")
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


def write_average(model, data, cfg: dict, step: int) -> dict:
    """avg.pt at the end of a run, the mean weights of its last average_last snapshots (the final
    weights, at `step`, the last of them); returns it."""
    if step % (cfg["average_every"] or cfg["eval_interval"]):
        take_snapshot(model, data, cfg, step)
    averaged = average_checkpoints([path for _, path in snapshots(cfg["out_dir"])[-cfg["average_last"]:]])
    save_checkpoint(os.path.join(cfg["out_dir"], "avg.pt"), averaged)
    return averaged
