"""
Train a translation model: `python train.py config/transformer_multi30k.py [--key=value ...]`.

One loop for every model (arch = 'transformer' | 'rnn' is read only to construct it): token-
budget batches (batching.py), AdamW or Lion (optimizers.py) with a one-cycle learning rate
(linear warm-up; cosine, linear, exponential or inverse-square-root decay), label smoothing
(loss.py), gradient clipping and accumulation, bf16 or fp16 autocast (runtime.py), validation
loss + BLEU/chrF, self-contained checkpoints that resume exactly, DDP under torchrun. Read it
top to bottom: where a run stands (RunState), one optimizer step (train_step), the loop that
sequences steps, logs, evaluations and checkpoints (train_loop), then main(). It also shows what
goes wrong early: the loss at step 0 next to ln(V), gradient norms per side, an overfit-one-
batch mode, toy copy/reverse tasks. Optional: early stopping on validation BLEU, averaging the
weights of the last snapshots (avg.pt). prune.py reuses train_loop with a penalty. Leaves out:
exponential moving averages, curricula.
"""

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

from batching import TrainBatches
from checkpoint import (average_checkpoints, build_model, checkpoint_of, keep_snapshot, load_checkpoint,
                        model_config_from, model_from_checkpoint, save_checkpoint, snapshots)
from configurator import ConfigError, configure, knob_names, main_guard
from data import DataConfig, DataError, load_data
from decoding import evaluate
from loss import sequence_loss
from optimizers import make_optimizer
from runlog import Interval, RunLog, SpikeWatch, log_step, plot_log, printable, progress_bar
from runtime import Runtime, StopSignals, setup

# -----------------------------------------------------------------------------
# knobs: defaults here, overridden by config/<name>.py, then by --key=value
# I/O
out_dir = "out"  # run folder: ckpt.pt (latest), best.pt (best validation BLEU), log.jsonl, plots, snapshots/, avg.pt
init_from = "scratch"  # 'scratch', 'resume' (continue out_dir/ckpt.pt), or a checkpoint path to fine-tune
log_interval = 50  # steps between log lines
eval_interval = 500  # steps between validation runs (loss, BLEU) and checkpoints
eval_sentences = 500  # validation sentences decoded for BLEU (0 = all)
eval_beam = 1  # beam size for validation BLEU: 1 = greedy (fast); beam search is slower and scores higher
plot = True  # draw plots.png (loss, learning rate, gradient norm, BLEU) from log.jsonl at the end
seed = 1337  # seeds the weights, dropout and batch order
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = "auto"  # 'auto' (bf16 on CPUs and GPUs from A100 on, fp16 on older GPUs), 'bfloat16', 'float16', 'float32'
# data: every field of data.DataConfig is a knob here too (python data.py -h lists them)
dataset = "Helsinki-NLP/opus_books"  # hub name, a local folder (train.jsonl ...), or toy:copy / toy:reverse
dataset_config = "en-it"  # hub config name ('' for none)
src_lang = "en"  # source language key in the data
tgt_lang = "it"  # target language key in the data
val_size = 1000  # sentences carved out for validation when the data has no such split (5% if smaller)
test_size = 1000  # sentences carved out for test when the data has no such split (5% if smaller)
tokenizer = "bpe"  # 'bpe' | 'char' | 'tiktoken:<name>'
vocab_size = 8000  # tokenizer vocabulary size (an upper bound for char)
joint_vocab = True  # one vocabulary for source and target (allows three-way embedding tying)
max_len = 128  # tokens per side; longer training pairs are dropped or truncated
too_long = "drop"  # what to do with training pairs over max_len: 'drop' | 'truncate'
max_len_ratio = 3.0  # drop training pairs whose (longer+1)/(shorter+1) token ratio exceeds this
batch_tokens = 4096  # tokens per batch, padded source + target (the batch size)
length_pool = 65536  # sentences sorted together by length: larger = less padding, less random batches
cache_dir = "cache"  # where tokenized splits are cached ('' = no cache)
lowercase = False  # lower-case both sides of every split, as published Multi30k results are trained
# model
arch = "transformer"  # 'transformer' or 'rnn'
d_model = 256  # model width D
n_head = 4  # attention heads H
n_enc_layer = 3  # encoder layers
n_dec_layer = 3  # decoder layers
d_ff = 1024  # feed-forward hidden width
dropout = 0.1  # dropout on embeddings and sub-layer outputs (and, by default, the two below)
attn_dropout = -1.0  # Transformer: dropout on attention weights (-1 = dropout; fairseq's default is 0)
ff_dropout = -1.0  # Transformer: dropout on the feed-forward hidden layer (-1 = dropout; fairseq's default is 0)
pre_norm = True  # LayerNorm before each sub-layer (stable); False = post-LN as in Vaswani et al.
tie_embeddings = "all"  # 'all' (source = target = output, needs joint_vocab), 'output', or 'none'
attn_impl = "auto"  # 'auto' (math on CPU, sdpa on GPU), 'math' (explicit softmax), 'sdpa' (PyTorch's fused kernels)
# model: rnn (model_rnn.py); n_enc_layer, n_dec_layer, dropout and tie_embeddings apply to it too
emb_dim = 256  # RNN embedding width
hidden_size = 512  # RNN GRU state width
bidirectional = False  # RNN encoder reads the source in both directions
attention = "none"  # RNN attention: 'none' (bottleneck), 'dot' (Luong), 'additive' (Bahdanau)
teacher_forcing = 1.0  # RNN: probability of feeding the true previous token in training
bottleneck = "sutskever"  # RNN without attention: 'sutskever' (summary starts the decoder), 'cho' (also every step)
reverse_source = False  # RNN: read each source sentence backwards (Sutskever et al. 2014)
embed_scale = True  # RNN: embeddings times sqrt(emb_dim) as GRU input (model_rnn.py says why)
# optimisation
optimizer = "adamw"  # 'adamw' or 'lion' (Chen et al. 2023: wants a 3-10x lower learning_rate, higher weight_decay)
learning_rate = 1e-3  # peak learning rate of the one-cycle schedule
min_lr = 1e-5  # learning rate at the end of the decay
warmup_frac = 0.3  # share of the run spent warming up linearly from 0 to learning_rate
decay = "cosine"  # decay after the warm-up: 'cosine', 'linear', 'exp' (geometric, to min_lr) or 'rsqrt' (lr_at)
weight_decay = 0.01  # decoupled weight decay (not on biases, norms, gates)
beta1 = 0.9  # AdamW: first-moment decay; Lion: how much momentum the update's sign reads
beta2 = 0.98  # AdamW: second-moment decay; Lion: momentum decay (the paper uses 0.99)
grad_clip = 1.0  # clip the total gradient norm to this (0 = off)
label_smoothing = 0.1  # epsilon of label smoothing (Szegedy et al. 2016)
grad_accum = 1  # batches per optimizer step
max_bad_steps = 10  # stop after this many non-finite losses/gradients in a row
spike_factor = 2.0  # warn when a step's loss exceeds this multiple of its running mean (0 = off)
# stopping: whichever is reached first; the learning-rate schedule spans the limits that are set
max_iters = 0  # optimizer steps (0 = no limit)
max_epochs = 0.0  # passes over the training data (0 = no limit)
max_minutes = 0.0  # wall-clock training budget (0 = no limit)
patience = 0  # early stopping: stop after this many evaluations in a row without a better validation BLEU (0 = off)
# checkpoint averaging
average_last = 0  # > 1: at the end, also write avg.pt, the mean weights of the last N snapshots, and validate it
average_every = 0  # steps between the snapshots kept for averaging, in out_dir/snapshots (0 = eval_interval)
# debugging
overfit_batches = 0  # > 0: train on the first N batches only, unshuffled, no dropout or smoothing
# -----------------------------------------------------------------------------


def knobs() -> dict:
    """The training knobs above, as a dict (after configure() has overridden them)."""
    g = globals()
    return {k: g[k] for k in TRAIN_KEYS}


TRAIN_KEYS = knob_names(globals())
DEFAULTS = knobs()      # before any override: what a config written by an older version lacks


# -----------------------------------------------------------------------------
# where a run stands, and the batches it reads

@dataclass
class RunState:
    """Where a run stands. A checkpoint stores these fields beside weights and optimizer moments,
    and they are all a resumed run needs: the learning rate is a function of them, the batch
    order of (seed, epoch), and each step's random draws are seeded from (seed, rank, step)."""
    step: int = 0               # optimizer steps taken
    epoch: int = 0              # the pass over the training data in progress (from 0)
    batch_in_epoch: int = 0     # batches of that epoch already taken
    minutes: float = 0.0        # training time so far (process 0's clock)
    best_bleu: float = -1.0     # best validation BLEU so far
    evals_without_gain: int = 0  # evaluations since the best one (early stopping: the run stops at patience)
    bad_steps: int = 0          # non-finite steps in a row (the run stops at max_bad_steps)

    @classmethod
    def of_checkpoint(cls, ckpt: dict) -> "RunState":
        return cls(**{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt})


# -----------------------------------------------------------------------------
# the pieces of a step

DECAYS = ("cosine", "linear", "exp", "rsqrt")   # the schedule's shapes after the warm-up (lr_at)


def lr_at(progress: float, cfg: dict) -> float:
    """One-cycle schedule (Smith 2018): warm up linearly, then anneal to min_lr.

    progress p in [0, 1], warm-up share w:   lr = peak * p / w                      for p < w
      cosine: lr = min + (peak - min) * (1 + cos(pi * (p - w) / (1 - w))) / 2       for p >= w
      linear: lr = min + (peak - min) * (1 - (p - w) / (1 - w))
      exp:    lr = peak * (min / peak) ** ((p - w) / (1 - w))    (exponential decay)
      rsqrt:  lr = peak * sqrt(w / p)     (inverse square root, Vaswani et al. 2017; ignores min_lr
              and ends at peak * sqrt(w): the last checkpoints still differ, for averaging)
    """
    peak, low, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]
    if cfg["decay"] not in DECAYS:
        raise ConfigError(f"decay='{cfg['decay']}' is not known: use one of {', '.join(DECAYS)}")
    if cfg["decay"] == "rsqrt" and w <= 0:
        raise ConfigError("decay='rsqrt' needs a warm-up (lr = peak * sqrt(warmup_frac / progress)): "
                          "set warmup_frac > 0, e.g. --warmup_frac=0.1")
    if progress < w:
        return peak * progress / w
    if cfg["decay"] == "rsqrt":
        return peak * math.sqrt(w / progress)
    x = min(1.0, (progress - w) / max(1e-9, 1 - w))
    if cfg["decay"] == "linear":
        return low + (peak - low) * (1 - x)
    if cfg["decay"] == "exp":
        return peak * (low / peak) ** x
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * x))            # cosine


def stop_reason(run: RunState, epochs: float, cfg: dict) -> str:
    """Why the run stops now ('' = it goes on): a limit that is set, or early stopping."""
    if cfg["max_iters"] and run.step >= cfg["max_iters"]:
        return f"max_iters={cfg['max_iters']} steps done"
    if cfg["max_epochs"] and epochs >= cfg["max_epochs"]:
        return f"max_epochs={cfg['max_epochs']:g} epochs done"
    if cfg["max_minutes"] and run.minutes >= cfg["max_minutes"]:
        return f"max_minutes={cfg['max_minutes']:g} minutes done"
    if cfg["patience"] and run.evals_without_gain >= cfg["patience"]:
        return (f"early stopping: no better validation BLEU in {run.evals_without_gain} evaluations "
                f"(best {run.best_bleu:.2f})")
    return ""


def run_progress(step: int, epochs: float, minutes: float, cfg: dict) -> float:
    """How far the run is, in [0, 1]: the furthest of the limits that are set."""
    parts = [step / cfg["max_iters"] if cfg["max_iters"] else 0.0,
             epochs / cfg["max_epochs"] if cfg["max_epochs"] else 0.0,
             minutes / cfg["max_minutes"] if cfg["max_minutes"] else 0.0]
    return min(1.0, max(parts))


def grad_norms(model) -> torch.Tensor:
    """(3,) L2 norms of the gradients: all, encoder side (parameters named enc*/src*), decoder side
    (the rest). Stays on the device: reading it is the caller's one synchronisation."""
    sides = {"enc": [], "dec": []}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sides["enc" if name.startswith(("enc", "src")) else "dec"].append(p.grad)
    device = next(model.parameters()).device
    enc, dec = (torch.nn.utils.get_total_norm(g).float() if g else torch.zeros((), device=device)
                for g in sides.values())
    return torch.stack([torch.hypot(enc, dec), enc, dec])


def unwrap(model):
    """The model itself, also when DistributedDataParallel wraps it."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_step(model, optimizer, scaler, micro_batches: list, pad_id: int, cfg: dict, rt: Runtime,
               penalty=None, loss_fn=None) -> dict:
    """One optimizer step over this process's `grad_accum` micro-batches of the global batch:
    forward, loss and backward for each, then unscale (fp16), gradient norms, clipping, update.

    Returns what the log needs: `loss` (the label-smoothed loss per target token of the global
    batch, without the penalty), `tokens`, gradient norms `gnorm`/`gnorm_enc`/`gnorm_dec` before
    clipping, and `update`: 'done'; 'skipped' (a non-finite loss, or non-finite gradients without
    loss scaling, or with a loss scale already below 1: a bad step, counted); or 'overflow'
    (fp16 loss scaling overflowed: routine while the scaler finds its scale, so the scaler skips
    the update and lowers it). The values are read back from the device once, together (with
    fp16, GradScaler also reads its overflow flag; under torchrun the loop agrees on the clock).
    loss_fn: the summed training loss, loss.sequence_loss unless given (bench.py times its
    baselines with the F.cross_entropy their users would write)."""
    raw = unwrap(model)
    smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
    # divide by the target tokens of the whole global batch (counted on the CPU, then summed
    # over the processes), as one process taking all of it at once would
    n_tok = rt.all_sum(sum((b[2] != pad_id).sum() for b in micro_batches).to(rt.device, torch.float32))
    loss_sum = torch.zeros((), device=rt.device)
    for i, batch in enumerate(micro_batches):
        src, tgt_in, tgt_out = rt.to_device(*batch)
        last = i == len(micro_batches) - 1          # DDP: average gradients once, after the last
        with model.no_sync() if rt.world_size > 1 and not last else contextlib.nullcontext():
            with rt.amp:
                logits = model(src, tgt_in)                                   # (B, T, V)
            share = (loss_fn or sequence_loss)(logits, tgt_out, pad_id, smoothing) / n_tok   # of the batch mean
            loss_sum += share.detach()
            # DDP averages gradients over processes; * world_size undoes that, so the gradient
            # is that of the global batch's mean loss
            loss = share * rt.world_size + (penalty() if penalty is not None and i == 0 else 0.0)
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)                  # the true gradients, for the norms and clipping
    norms = grad_norms(raw)
    loss, tokens, gnorm, gnorm_enc, gnorm_dec = torch.cat([rt.all_sum(loss_sum)[None], n_tok[None], norms]).tolist()
    report = dict(loss=loss, tokens=int(tokens), gnorm=gnorm, gnorm_enc=gnorm_enc, gnorm_dec=gnorm_dec)
    # gradients agree across processes (DDP averaged them), so every process decides alike
    if not math.isfinite(loss) or (scaler is None and not math.isfinite(gnorm)):
        report["update"] = "skipped"
        if scaler is not None:
            scaler.update()                         # unscale_ saw the infs: the scale goes down
    else:
        if math.isfinite(gnorm) and cfg["grad_clip"] > 0:      # the norm from above, not computed twice
            torch.nn.utils.clip_grads_with_norm_(raw.parameters(), cfg["grad_clip"], norms[0])
        if scaler is not None:
            scaler.step(optimizer)                  # skips the update if the scaled gradients overflowed
            scaler.update()                         # lowers the scale after an overflow, raises it now and then
        else:
            optimizer.step()
        report["update"] = "done" if math.isfinite(gnorm) else "overflow"
        # gradients that overflow even when scaled down are not fp16's range: they are non-finite
        if report["update"] == "overflow" and scaler.get_scale() < 1.0:
            report["update"] = "skipped"
    optimizer.zero_grad(set_to_none=True)
    return report


# -----------------------------------------------------------------------------
# evaluation and what the loop reports

@torch.no_grad()
def check_initial_loss(model, batch: tuple, pad_id: int, vocab_size: int, rt: Runtime, log: RunLog) -> None:
    """The first sanity check: an untrained model should be as unsure as uniform guessing, so its
    loss is close to ln(V). Logits of unit variance (this project's initialisation) start about
    0.5 nats above ln(V) whatever V is (the mean of logsumexp over V standard normals). Far above
    means over-confident first guesses (weights too large, a wrong output layer); below means
    the model sees the word it must predict (a leaking mask) or the loss is divided by the wrong
    count. The tolerance is 1 nat, not a share of ln(V): 10% of ln(15) is 0.27 nats, less than
    unit-variance logits add on a 15-symbol toy task, while for a 6k-word vocabulary 1 nat is 11%."""
    model.eval()
    src, tgt_in, tgt_out = rt.to_device(*batch)
    with rt.amp:
        loss = (sequence_loss(model(src, tgt_in), tgt_out, pad_id, 0.0) / (tgt_out != pad_id).sum()).item()
    model.train()
    ln_v = math.log(vocab_size)
    log.record("init", f"step 0: loss {loss:.3f}, ln(V) = {ln_v:.3f} ({loss - ln_v:+.2f} nats)",
               step=0, loss=loss, ln_v=ln_v)
    if abs(loss - ln_v) > 1.0:
        log.say("warning: the initial loss is more than 1 nat away from ln(V): check the weight "
                "initialisation, the output layer and the loss masking")


def validate(model, data, cfg: dict, rt: Runtime, run: RunState, log: RunLog, penalty) -> bool:
    """Process 0 evaluates on the validation split and logs it with a few translations; then
    run.best_bleu and run.evals_without_gain hold on every process. Returns whether BLEU improved."""
    improved = False
    if rt.master:
        ev = evaluate(model, data, cfg["batch_tokens"], rt.device, rt.amp, n_sentences=cfg["eval_sentences"],
                      beam=cfg["eval_beam"])
        extra = penalty.log(run.step) if penalty is not None else {}
        log.record("eval", f"eval step {run.step}: val loss {ev['loss']:.3f}, ppl {ev['ppl']:.2f}, "
                   f"BLEU {ev['bleu']:.2f} (lower-cased {ev['bleu_lc']:.2f}), chrF {ev['chrf']:.2f} "
                   f"({ev['sentences']} sentences)"
                   + printable(extra, ", "), step=run.step, val_loss=ev["loss"], ppl=ev["ppl"], bleu=ev["bleu"],
                   bleu_lc=ev["bleu_lc"], chrf=ev["chrf"], examples=ev["examples"], **extra)
        for ex in ev["examples"]:
            log.say(f"  src: {ex['src']}\n  ref: {ex['ref']}\n  hyp: {ex['hyp']}")
        improved = ev["bleu"] > run.best_bleu
        run.best_bleu = max(run.best_bleu, ev["bleu"])
        run.evals_without_gain = 0 if improved else run.evals_without_gain + 1
    run.best_bleu, evals = rt.from_master([run.best_bleu, run.evals_without_gain])
    run.evals_without_gain = int(evals)
    return improved


def write_average(data, cfg: dict, rt: Runtime, log: RunLog) -> None:
    """avg.pt: the mean weights of the last average_last snapshots, validated like the run itself."""
    steps, paths = zip(*snapshots(cfg["out_dir"])[-cfg["average_last"]:])
    averaged = average_checkpoints(list(paths))
    save_checkpoint(os.path.join(cfg["out_dir"], "avg.pt"), averaged)
    model = model_from_checkpoint(averaged)[0].to(rt.device)
    ev = evaluate(model, data, cfg["batch_tokens"], rt.device, rt.amp, n_sentences=cfg["eval_sentences"],
                  beam=cfg["eval_beam"])
    log.record("average", f"avg.pt, the mean of {len(paths)} snapshots (steps {steps[0]}-{steps[-1]}): val loss "
               f"{ev['loss']:.3f}, BLEU {ev['bleu']:.2f} (lower-cased {ev['bleu_lc']:.2f}), chrF {ev['chrf']:.2f}",
               step=steps[-1], snapshots=len(paths), val_loss=ev["loss"], bleu=ev["bleu"], bleu_lc=ev["bleu_lc"],
               chrf=ev["chrf"])


def start_or_resume(raw, cfg: dict, rt: Runtime, resume: dict | None, penalty) -> tuple:
    """(optimizer, fp16 loss scaler or None, RunState): new ones, or as the checkpoint `resume` left them."""
    optimizer, scaler = make_optimizer(raw, cfg, getattr(penalty, "lr_scale", None)), rt.grad_scaler()
    if resume is None:
        return optimizer, scaler, RunState()
    try:
        optimizer.load_state_dict(resume["optimizer"])
    except ValueError as e:
        raise ConfigError(f"the checkpoint's optimizer state does not fit this model's parameters ({e}); a "
                          "checkpoint of an older version? Start a new run from it: --init_from=PATH") from None
    if scaler is not None and resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    return optimizer, scaler, RunState.of_checkpoint(resume)


class Diverged(Exception):
    """max_bad_steps non-finite steps in a row. Nothing is saved: the last checkpoint is the last good state."""


# -----------------------------------------------------------------------------
# the training loop

def train_loop(model, data, cfg: dict, rt: Runtime, resume: dict | None = None, penalty=None) -> RunState:
    """Train until max_iters / max_epochs / max_minutes, early stopping (patience) or a signal,
    from scratch or from where the checkpoint `resume` stopped; return where the run stands.
    Every eval_interval steps and at the end: validate, write ckpt.pt (and best.pt when BLEU
    improved). On a signal: write ckpt.pt and stop. With average_last: keep snapshots of the
    weights every average_every steps, and at the end write and validate avg.pt, their mean.

    model may be wrapped in DDP. penalty (prune.py's L0 term): a callable giving a tensor that
    is added to the loss of every step, with `log(step)` giving {name: value} for the log (lists
    and dicts go to log.jsonl only) and `lr_scale` {parameter-name suffix: multiplier of the
    learning rate} for the parameters it adds. Raises Diverged after max_bad_steps bad steps in a row."""
    cfg = {**DEFAULTS, **cfg}      # a checkpoint's config from an older version may lack newer knobs
    if not (cfg["max_iters"] or cfg["max_epochs"] or cfg["max_minutes"]):
        raise ConfigError("no stop condition: set max_iters, max_epochs or max_minutes (e.g. --max_minutes=30)")
    raw, pad_id = unwrap(model), data.tgt_tok.pad_id
    optimizer, scaler, run = start_or_resume(raw, cfg, rt, resume, penalty)
    batches = TrainBatches(data, cfg, rt.rank, rt.world_size)
    if not batches.of_epoch(run.epoch):
        raise DataError("the training split gives no batches (fewer batches than processes?)")
    bar = progress_bar() if rt.master else None
    log = RunLog(cfg["out_dir"], rt.master, bar, resume_step=run.step if resume is not None else None)
    if resume is None and rt.master:                # an earlier run's snapshots are not this run's to average
        for _, path in snapshots(cfg["out_dir"]):
            os.remove(path)

    def checkpoint(improved: bool = False) -> None:     # process 0 writes ckpt.pt, and best.pt if BLEU improved
        if rt.master:
            state = checkpoint_of(raw, data.src_tok, data.tgt_tok, cfg, optimizer=optimizer.state_dict(),
                                  scaler=scaler.state_dict() if scaler is not None else None,
                                  world_size=rt.world_size, **asdict(run))
            save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), state)
            if improved and penalty is None:            # (a penalised run's best BLEU is its least pruned model)
                save_checkpoint(os.path.join(cfg["out_dir"], "best.pt"), state)

    snapshot_every = cfg["average_every"] or cfg["eval_interval"]

    def snapshot() -> None:                         # process 0 keeps these weights for averaging
        if rt.master and cfg["average_last"] > 1:
            keep_snapshot(cfg["out_dir"], checkpoint_of(raw, data.src_tok, data.tgt_tok, cfg, step=run.step),
                          run.step, cfg["average_last"])

    model.train()
    if run.step == 0 and cfg["init_from"] == "scratch" and rt.master:
        check_initial_loss(raw, batches.next(RunState()), pad_id, data.tgt_tok.vocab_size, rt, log)
    if cfg["overfit_batches"] and run.step == 0:
        log.say(f"overfit mode: the first {cfg['overfit_batches']} batch(es), same order every epoch, "
                "dropout 0 and label smoothing 0: the loss should fall near zero")
    spikes, interval = SpikeWatch(cfg["spike_factor"]), Interval()
    t_start = time.time() - 60 * run.minutes
    with StopSignals() as signals:
        while True:
            run.minutes, signalled = rt.agree((time.time() - t_start) / 60, bool(signals.received))
            epochs = batches.epochs_done(run)
            if signalled:                           # by this process or another
                stop = f"received {signals.received or 'a signal (on another process)'}"
            else:
                stop = stop_reason(run, epochs, cfg)
            if stop:
                break
            lr = lr_at(run_progress(run.step, epochs, run.minutes, cfg), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            # the random draws of a step (dropout, teacher forcing, gate noise) come from a seed
            # made of (seed, process, step): a resumed run draws what the uninterrupted run drew,
            # with no generator state to save, and each process of a distributed run draws its own
            torch.manual_seed(hash((cfg["seed"], rt.rank, run.step)) % 2**63)
            micro_batches = [batches.next(run) for _ in range(cfg["grad_accum"])]
            out = train_step(model, optimizer, scaler, micro_batches, pad_id, cfg, rt, penalty)
            if out["update"] == "skipped":
                run.bad_steps += 1
                log.say(f"step {run.step + 1}: non-finite loss or gradient, update skipped ({run.bad_steps} in a row)")
                if run.bad_steps >= cfg["max_bad_steps"]:
                    raise Diverged(f"{run.bad_steps} non-finite steps in a row at step {run.step + 1} (lr {lr:.2e}, "
                                   f"gradient norm {out['gnorm']}). Try a lower learning_rate, grad_clip=1, "
                                   "or dtype=float32.")
                continue
            run.step, run.bad_steps = run.step + 1, 0
            interval.add(out, micro_batches, data.src_tok.pad_id, pad_id)
            running = spikes(out["loss"])
            if running is not None:
                log.say(f"warning: loss spike at step {run.step}: {out['loss']:.3f}, running mean {running:.3f} "
                        f"(lr {lr:.2e}, gradient norm {out['gnorm']:.2f}). If it repeats or the loss stays "
                        "up: lower learning_rate, longer warmup_frac, grad_clip=1.")
            if bar is not None:
                bar.n = round(100 * run_progress(run.step, epochs, run.minutes, cfg), 1)
                bar.refresh()
            if run.step % cfg["log_interval"] == 0 or run.step == 1:
                log_step(log, run, epochs, lr, out, interval, penalty.log(run.step) if penalty is not None else {})
                interval = Interval()
            if run.step % snapshot_every == 0:
                snapshot()                          # before validating: a kill in between redoes both
            if run.step % cfg["eval_interval"] == 0:
                started = time.time()
                checkpoint(validate(raw, data, cfg, rt, run, log, penalty))
                interval.started += time.time() - started      # tokens/s: training time only
    if bar is not None:
        bar.close()
    log.say(f"stopping: {stop}")
    if signalled:
        checkpoint()
        log.say(f"saved {os.path.join(cfg['out_dir'], 'ckpt.pt')}; continue with --init_from=resume")
        return run
    if run.step % cfg["eval_interval"] != 0:                       # the final evaluation and checkpoint
        checkpoint(validate(raw, data, cfg, rt, run, log, penalty))
    if cfg["average_last"] > 1 and rt.master:
        if run.step % snapshot_every != 0:
            snapshot()                                             # the final weights are the last one
        write_average(data, cfg, rt, log)
    return run


# -----------------------------------------------------------------------------

def main() -> RunState:
    given = configure(globals(), doc_files=(__file__,))
    cfg, resume = knobs(), None
    if cfg["init_from"] == "resume":
        resume = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        # the run goes on with its own configuration; its limits, intervals, device and precision
        # may be changed by naming them (e.g. --max_minutes=60 to extend it)
        may_change = ("max_iters", "max_epochs", "max_minutes", "patience", "eval_interval", "log_interval", "device",
                      "dtype", "plot")
        ignored = [k for k, v in given.items() if k not in may_change and k != "init_from"
                   and resume["train_config"].get(k, DEFAULTS[k]) != v]
        if ignored:
            print(f"resuming with the run's own configuration: ignoring {', '.join(ignored)} "
                  f"(a resumed run may change only {', '.join(may_change)})")
        cfg = {**DEFAULTS, **resume["train_config"], **{k: v for k, v in given.items() if k in may_change},
               "init_from": "resume"}
    if cfg["overfit_batches"]:
        cfg["dropout"] = cfg["attn_dropout"] = cfg["ff_dropout"] = 0.0
    rt = setup(cfg["device"], cfg["dtype"])
    if resume is not None and resume.get("world_size", 1) != rt.world_size:
        raise ConfigError(f"the run in {cfg['out_dir']} trained with {resume.get('world_size', 1)} process(es), and "
                          f"{rt.world_size} would take other batches: resume with as many, or start a new run from "
                          f"its checkpoint with --init_from={os.path.join(cfg['out_dir'], 'ckpt.pt')}")
    if rt.master:
        try:
            os.makedirs(cfg["out_dir"], exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create out_dir '{cfg['out_dir']}': {e.strerror or e}. "
                              "Choose another --out_dir.") from None
    data = load_data(DataConfig.of(cfg), verbose=rt.master)

    torch.manual_seed(cfg["seed"])
    source = resume                         # or a checkpoint to fine-tune (e.g. a pruned model)
    if resume is None and cfg["init_from"] != "scratch":
        source = load_checkpoint(cfg["init_from"])
    if source is not None:
        model, data.src_tok, data.tgt_tok = model_from_checkpoint(source, verbose=rt.master)
    else:
        model = build_model(cfg["arch"], model_config_from(cfg, data.src_tok, data.tgt_tok), verbose=rt.master)
    model.to(rt.device)
    if rt.master:
        print(f"device {rt.device}, dtype {rt.dtype}, {rt.world_size} process(es)")
    wrapped = model
    if rt.world_size > 1:
        # a pruned model can leave whole parts without gradient (the encoder, if no cross-attention
        # head is left): DDP must then look for unused parameters at every step
        pruned = any(p.numel() == 0 for p in model.parameters())
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device_type == "cuda" else None, find_unused_parameters=pruned)
    try:
        run = train_loop(wrapped, data, cfg, rt, resume)
    except Diverged as reason:
        if rt.master:
            print(f"stopping: {reason}")
        rt.shutdown()
        sys.exit(1)
    if rt.master:
        plots = f"; plots in {plot_log(cfg['out_dir'])}" if cfg["plot"] else ""
        print(f"done: {run.step} steps, {run.minutes:.1f} min, best validation BLEU {run.best_bleu:.2f}{plots}")
    rt.shutdown()
    return run


if __name__ == "__main__":
    main_guard(main, DataError)
