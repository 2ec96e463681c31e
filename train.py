"""
Train a translation model: `python train.py config/transformer_multi30k.py [--key=value ...]`.

Read top to bottom: the knobs, where a run stands (RunState), the one-cycle schedule, one optimizer
step (train_step, update), validation, the loop (train_loop), build_model and main(). It is the loop
of one process in fp32 or bf16: what several processes, fp16, a time budget, Ctrl-C and exact resume
add comes from runtime.py, a chapter, through `rt` and `clock`; each call's comment names the plain
line it is on one process. prune.py trains its gates with this loop (a penalty added to the loss).
Leaves out: moving averages of the weights during training, curricula.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

from batching import TrainBatches
from checkpoint import (checkpoint_of, claim_run_dir, load_checkpoint, model_from_checkpoint, resumed_config,
                        save_checkpoint, take_snapshot, write_average)
from common import RunLog, StepLog, TensorBoard, plot_log, printable, progress_bar
from configurator import ConfigError, configure, knob_names, main_guard
from data import DataConfig, DataError, load_data
from decoding import evaluate
from diagnostics import check_initial_loss, probe_model
from loss import sequence_loss
from model_rnn import KNOBS as rnn_knobs, RNNConfig, Seq2SeqRNN
from model_transformer import Transformer, TransformerConfig
from runtime import Diverged, RunClock, Runtime, count_bad_step, run_process, setup
from speed import speed_up
from tokenizer import pair_from_state
from watch import StepChecks, Symptoms

# -----------------------------------------------------------------------------
# knobs: defaults here, overridden by config/<name>.py, then by --key=value; python train.py -h
# lists them all. The data knobs (dataset, tokenizer, vocab_size, max_len, batch_tokens, ...) are
# the fields of data.DataConfig, the GRU's (emb_dim, hidden_size, attention, ...) model_rnn.KNOBS.
out_dir = "out"  # run folder: ckpt.pt (latest), best.pt (best validation BLEU), log.jsonl, plots.png, avg.pt
init_from = "scratch"  # 'scratch', 'resume' (continue out_dir/ckpt.pt), or a checkpoint to fine-tune (its tokenizers too)
overwrite = False  # a new run may replace the run out_dir holds (otherwise it is refused)
log_interval = 50  # steps between log lines
eval_interval = 500  # steps between validation runs (loss, greedy BLEU) and checkpoints
eval_sentences = 500  # validation sentences translated for BLEU (0 = all)
plot = True  # draw plots.png (loss, learning rate, gradient norm, BLEU) from log.jsonl at the end
tensorboard = False  # also write log.jsonl's numbers and the warnings to out_dir/tensorboard (pip install tensorboard)
seed = 1337  # seeds the weights, dropout and batch order
device = "auto"  # 'auto' (a GPU if there is one), 'cpu', 'cuda', 'cuda:1', ...
dtype = "auto"  # 'float32', 'bfloat16', 'float16' or 'auto': bf16 on A100+ GPUs and bf16 CPUs, fp16 on older GPUs, else fp32
# model
arch = "transformer"  # 'transformer' (model_transformer.py) or 'rnn' (model_rnn.py)
d_model = 256  # Transformer width D
n_head = 4  # attention heads H
n_enc_layer = 3  # encoder layers (both models)
n_dec_layer = 3  # decoder layers (both models)
d_ff = 1024  # feed-forward hidden width
dropout = 0.1  # dropout on embeddings and sub-layer outputs (both models)
inner_dropout = True  # Transformer: dropout on attention weights and the feed-forward hidden layer too (fairseq: no)
pre_norm = True  # LayerNorm before each sub-layer (stable); False = post-LN as in Vaswani et al.
tie_embeddings = "all"  # 'all' (source = target = output, needs joint_vocab), 'output' or 'none'
attn_impl = "auto"  # 'auto' (math on a CPU, sdpa elsewhere), 'math' (explicit softmax), 'sdpa' (fused kernels)
# optimisation: AdamW with a one-cycle learning rate
learning_rate = 1e-3  # peak learning rate
min_lr = 1e-5  # learning rate at the end of the decay
warmup_frac = 0.3  # share of the run spent warming up linearly from 0 to learning_rate
decay = "cosine"  # after the warm-up: 'cosine', 'exp' (geometric, to min_lr) or 'rsqrt' (inverse square root)
weight_decay = 0.01  # decoupled weight decay, on weight matrices only
grad_clip = 1.0  # clip the total gradient norm to this (0 = off)
label_smoothing = 0.1  # epsilon of label smoothing (Szegedy et al. 2016)
grad_accum = 1  # batches per optimizer step
# stopping: whichever is reached first; the learning-rate schedule spans the limits that are set
max_iters = 0  # optimizer steps (0 = no limit)
max_epochs = 0.0  # passes over the training data (0 = no limit)
max_minutes = 0.0  # wall-clock training budget (0 = no limit)
patience = 0  # early stopping after this many evaluations without a better validation BLEU (0 = off)
average_last = 0  # > 1: at the end, also write avg.pt, the mean weights of the last N snapshots, and validate it
average_every = 0  # steps between the snapshots kept for averaging, in out_dir/snapshots (0 = eval_interval)
overfit_batches = 0  # debugging: > 0 trains on the first N batches only, unshuffled, no dropout or smoothing
# -----------------------------------------------------------------------------
RNN_DEFAULTS = {f.name: f.default for f in fields(RNNConfig) if f.name in rnn_knobs}
DEFAULTS = {**asdict(DataConfig()), **RNN_DEFAULTS, **{k: v for k, v in globals().items() if k in knob_names(globals())}}
POSITIVE = ("batch_tokens", "d_model", "n_head", "n_enc_layer", "n_dec_layer", "d_ff", "grad_accum", "log_interval",
            "eval_interval", "vocab_size", "max_len")      # knobs refused at 0 or below


@dataclass
class RunState:
    """Where a run stands: all a resumed run needs beside weights and optimizer moments (the learning
    rate is a function of it, the batch order of (seed, epoch), a step's draws of (seed, process, step))."""
    step: int = 0               # optimizer steps taken
    epoch: int = 0              # the pass over the training data in progress (from 0)
    batch_in_epoch: int = 0     # batches of that epoch already taken
    minutes: float = 0.0        # wall-clock time so far, validation included
    train_minutes: float = 0.0  # of it, the time spent in training steps
    time_progress: float = 0.0  # the schedule's clock under max_minutes, in [0, 1] (runtime.advance_clock)
    best_bleu: float = -1.0     # best validation BLEU so far
    evals_without_gain: int = 0  # evaluations since the best one (the run stops at patience)
    bad_steps: int = 0          # non-finite steps in a row (the run stops at runtime.MAX_BAD_STEPS)


def lr_at(progress: float, cfg: dict) -> float:
    """One-cycle schedule (Smith 2018): warm up linearly, then decay. Progress p in [0, 1], warm-up share w:

        p < w:   lr = peak * p / w
        cosine:  lr = min + (peak - min) * (1 + cos(pi * (p - w) / (1 - w))) / 2
        exp:     lr = peak * (min / peak) ** ((p - w) / (1 - w))
        rsqrt:   lr = peak * sqrt(w / p)   (Vaswani et al. 2017; ends at peak * sqrt(w), not at min_lr,
                 so the last checkpoints still differ, for averaging)
    """
    peak, low, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]
    if cfg["decay"] not in ("cosine", "exp", "rsqrt"):
        raise ConfigError(f"decay='{cfg['decay']}' is not known: use one of cosine, exp, rsqrt")
    if cfg["decay"] == "rsqrt" and w <= 0:
        raise ConfigError("decay='rsqrt' needs a warm-up (lr = peak * sqrt(w / p)): set warmup_frac > 0, e.g. 0.1")
    if progress < w:
        return peak * progress / w
    if cfg["decay"] == "rsqrt":
        return peak * math.sqrt(w / progress)
    x = min(1.0, (progress - w) / max(1e-9, 1 - w))
    if cfg["decay"] == "exp":
        return peak * (low / peak) ** x
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * x))


def run_progress(step: int, epochs: float, time_progress: float, cfg: dict) -> float:
    """How far the run is, in [0, 1]: the furthest of the limits that are set (time_progress: the
    share of max_minutes, as the run's clock counts it)."""
    parts = [step / cfg["max_iters"] if cfg["max_iters"] else 0.0,
             epochs / cfg["max_epochs"] if cfg["max_epochs"] else 0.0,
             time_progress if cfg["max_minutes"] else 0.0]
    return min(1.0, max(parts))


def stop_reason(run: RunState, epochs: float, cfg: dict) -> str:
    """Why the run stops now ('' = it goes on): a limit that is set, or early stopping."""
    if cfg["max_iters"] and run.step >= cfg["max_iters"]:
        return f"max_iters={cfg['max_iters']} steps done"
    if cfg["max_epochs"] and epochs >= cfg["max_epochs"]:
        return f"max_epochs={cfg['max_epochs']:g} epochs done"
    if cfg["max_minutes"] and run.minutes >= cfg["max_minutes"]:
        return f"max_minutes={cfg['max_minutes']:g} minutes done"
    if cfg["patience"] and run.evals_without_gain >= cfg["patience"]:
        return f"early stopping: no better validation BLEU in {run.evals_without_gain} evaluations (best {run.best_bleu:.2f})"
    return ""


def param_groups(model, cfg: dict, lr_scale: dict | None = None) -> list[dict]:
    """The trainable parameters in groups: weight decay on matrices only (not on biases, norms, gate
    logits); lr_scale {parameter-name suffix: multiplier} for groups that learn at a multiple of the
    schedule's rate (prune.py's gate logits)."""
    groups = {}                               # (weight decay?, lr multiplier) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((m for suffix, m in (lr_scale or {}).items() if name.endswith(suffix)), 1.0)
            groups.setdefault((p.dim() >= 2, scale), []).append(p)
    return [{"params": ps, "weight_decay": cfg["weight_decay"] if decays else 0.0, "lr_scale": scale}
            for (decays, scale), ps in groups.items()]


def make_optimizer(model, cfg: dict, lr_scale: dict | None = None) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019), decoupled weight decay; the loop sets each group's learning rate."""
    return torch.optim.AdamW(param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"], betas=(0.9, 0.98),
                             fused=True)


def grad_norms(model) -> torch.Tensor:
    """(3,) gradient L2 norms: all, encoder side, decoder side. The encoder side is the parameters
    named enc*/src*; an embedding shared by source and target (tie_embeddings='all') is registered
    as tgt_embed, so it counts on the decoder side. On the device."""
    sides = {"enc": [], "dec": []}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sides["enc" if name.startswith(("enc", "src")) else "dec"].append(p.grad)
    zero = torch.zeros((), device=next(model.parameters()).device)
    enc, dec = (torch.nn.utils.get_total_norm(g).float() if g else zero for g in sides.values())
    return torch.stack([torch.hypot(enc, dec), enc, dec])


def train_step(model, optimizer, micro_batches: list, pad_id: int, cfg: dict, rt: Runtime, penalty=None) -> dict:
    """One optimizer step over the grad_accum micro-batches of a batch: forward, loss and backward for each
    (their gradients add up), then update(). The loss is the mean over the target tokens of all of them.
    penalty: a callable whose tensor is added to the loss (prune.py's L0 penalty on its gates)."""
    smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
    # the batch's target tokens (rt.mean: the count itself on one process; with several, their mean)
    n_tok = rt.mean(sum((b[2] != pad_id).sum() for b in micro_batches).to(rt.device, torch.float32))
    loss_sum = torch.zeros((), device=rt.device)
    for i, batch in enumerate(micro_batches):
        src, tgt_in, tgt_out = rt.to_device(*batch)
        with rt.amp:                                                  # bf16 autocast; nothing in fp32
            logits = model(src, tgt_in)                               # (B, T, V)
        loss = sequence_loss(logits, tgt_out, pad_id, smoothing) / n_tok   # this micro-batch's share of the mean
        loss_sum += loss.detach()
        if penalty is not None and i == 0:
            loss = loss + penalty()
        rt.backward(loss)                                             # loss.backward()
    return update(model, optimizer, loss_sum, n_tok, cfg, rt)


def probe_step(model, data, cfg: dict, rt: Runtime):
    """train_step as a callable (micro_batches, optimizer) for the probes before step 1 (diagnostics.py:
    step_gradient), in full precision as every probe (bf16's autocast itself is not probed), or None:
    on one process only (a step on process 0 alone would wait for the others)."""
    if rt.world_size > 1:
        return None
    full = replace(rt, dtype="float32", scaler=None)    # (bf16's autocast: twice the time on a few sentences;
    #                                                     fp16's scaler: its state left as the run has it)
    return lambda micro_batches, kept: train_step(model, kept, micro_batches, data.tgt_tok.pad_id, cfg, full)


def update(model, optimizer, loss_sum: torch.Tensor, n_tok: torch.Tensor, cfg: dict, rt: Runtime) -> dict:
    """The step's second half: gradient norms, clipping, the optimizer's update. Returns `loss` (per
    target token, without the penalty), `tokens`, the norms before clipping (`gnorm`, `gnorm_enc`,
    `gnorm_dec`) and `update`: 'done', or 'skipped' (a non-finite loss or gradient: no update)."""
    rt.finish_backward(model, optimizer)                              # nothing (runtime.py: processes, fp16)
    norms = grad_norms(model)
    loss, tokens, gnorm, gnorm_enc, gnorm_dec = torch.cat([rt.mean(loss_sum)[None], n_tok[None], norms]).tolist()
    report = dict(loss=loss, tokens=int(tokens), gnorm=gnorm, gnorm_enc=gnorm_enc, gnorm_dec=gnorm_dec)
    if math.isfinite(loss) and math.isfinite(gnorm):
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg["grad_clip"], norms[0])
        report["update"] = rt.step(optimizer)                         # optimizer.step(); 'done'
    else:
        report["update"] = rt.skip(optimizer, loss)                   # 'skipped'
    optimizer.zero_grad(set_to_none=True)
    return report


def validate(model, data, cfg: dict, rt: Runtime, run: RunState, log: RunLog, extra: dict,
             kind: str = "eval") -> bool:
    """Score the validation split (loss, greedy BLEU, chrF), log it with a few translations, keep the best
    BLEU in `run`; return whether it improved. kind 'average': avg.pt's score."""
    if not rt.master:                   # (under torchrun process 0 validates; the others wait in the clock)
        return False
    started = time.time()
    ev = evaluate(model, data, cfg["batch_tokens"], rt.device, rt.amp, n_sentences=cfg["eval_sentences"])
    seconds = time.time() - started
    what = f"eval step {run.step}" if kind == "eval" else f"avg.pt, the mean of {extra['snapshots']} snapshots"
    log.record(kind, f"{what}: val loss {ev['loss']:.3f} (+{ev['source_gain']:.2f} with other sources), ppl "
               f"{ev['ppl']:.2f}, BLEU {ev['bleu']:.2f} (lower-cased {ev['bleu_lc']:.2f}), chrF {ev['chrf']:.2f} "
               f"({ev['sentences']} sentences, {seconds:.1f} s)" + printable(extra, ", "), step=run.step,
               val_loss=ev["loss"], source_gain=ev["source_gain"], ppl=ev["ppl"], bleu=ev["bleu"],
               bleu_lc=ev["bleu_lc"], chrf=ev["chrf"], length_ratio=ev["length_ratio"], seconds=seconds, examples=ev["examples"], **extra)
    for ex in ev["examples"]:
        log.say(f"  src: {ex['src']}\n  ref: {ex['ref']}\n  hyp: {ex['hyp']}")
    improved = ev["bleu"] > run.best_bleu
    if kind == "eval":
        run.best_bleu = max(run.best_bleu, ev["bleu"])
        run.evals_without_gain = 0 if improved else run.evals_without_gain + 1
    return improved


# -----------------------------------------------------------------------------
# the training loop

def loop_step(model, optimizer, batches: TrainBatches, run: RunState, epochs: float, cfg: dict, rt: Runtime,
              penalty=None) -> tuple[float, list, dict]:
    """One turn of the loop: the schedule's learning rate, this step's seed, the next grad_accum batches
    (run.epoch, run.batch_in_epoch move on), train_step. Returns (lr, the CPU batches, its report)."""
    lr = lr_at(run_progress(run.step, epochs, run.time_progress, cfg), cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    # a step's random draws (dropout, teacher forcing, gate noise) are seeded from (seed, process, step): a resumed
    # run draws what the uninterrupted one drew (Python's hash of ints is the same in every run; of strings, not)
    torch.manual_seed(hash((cfg["seed"], rt.rank, run.step)) % 2**63)
    micro_batches = []
    for _ in range(cfg["grad_accum"]):
        batch, run.epoch, run.batch_in_epoch = batches.next(run.epoch, run.batch_in_epoch)
        micro_batches.append(batch)
    pad_id = batches.data.tgt_tok.pad_id
    return lr, micro_batches, train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty)


def train_loop(model, optimizer, data, cfg: dict, rt: Runtime, resume: dict | None = None, penalty=None) -> RunState:
    """Train from scratch, or from where the checkpoint `resume` stopped, until a limit, early stopping
    or a signal; return where the run stands. Every eval_interval steps and at the end: validate, write
    ckpt.pt (and best.pt when BLEU improved); on a signal, write ckpt.pt and stop. Param groups may carry
    an `lr_scale`; penalty (prune.py's L0 gates): a callable whose tensor joins every step's loss, with
    log(step) giving {name: value} for the log lines. Process 0 (rt.master) logs, validates and saves."""
    if not (cfg["max_iters"] or cfg["max_epochs"] or cfg["max_minutes"]):
        raise ConfigError("no stop condition: set max_iters, max_epochs or max_minutes (e.g. --max_minutes=30)")
    run = rt.start(optimizer, cfg, resume, RunState)      # RunState(), or where `resume` stopped
    batches = rt.share(TrainBatches(data, cfg["batch_tokens"], cfg["seed"], cfg["overfit_batches"]))
    if not batches.of_epoch(run.epoch):
        raise DataError("the training split gives no batches (fewer batches than processes?)")
    watchers = [Symptoms(cfg["learning_rate"], cfg["warmup_frac"])]                # watch.py
    if cfg["tensorboard"] and rt.master:
        watchers.append(TensorBoard(cfg["out_dir"], run.step if resume else None))    # the records copied there
    log = RunLog(cfg["out_dir"], rt.master, progress_bar() if rt.master else None, run.step if resume else None,
                 watchers=watchers)
    from_scratch = cfg["init_from"] == "scratch" and not resume          # (the whole model's update: judged then)
    checks = StepChecks(log, model, cfg["overfit_batches"], optimizer, cfg["learning_rate"] if from_scratch else 0.0) \
        if rt.master else None                                                          # watch.py
    steps_log = StepLog(log, data.src_tok.pad_id, data.tgt_tok.pad_id, rt.device_type, checks)
    penalty_values = (lambda: penalty.log(run.step)) if penalty is not None else dict   # for the log lines

    def save(improved: bool = False) -> None:       # process 0 writes ckpt.pt, and best.pt if BLEU improved
        if rt.master:
            state = checkpoint_of(model, data.src_tok, data.tgt_tok, cfg, optimizer=optimizer.state_dict(),
                                  **rt.state(), **asdict(run))      # (runtime.py's: the fp16 scale, processes)
            save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), state)
            if improved and penalty is None:        # (with a penalty the best BLEU comes before it bites)
                save_checkpoint(os.path.join(cfg["out_dir"], "best.pt"), state)

    model.train()
    if run.step == 0 and rt.master and cfg["init_from"] == "scratch":    # diagnostics.py, before step 1:
        check_initial_loss(model, batches.next(0, 0)[0], sequence_loss, data, log)   # loss ~ ln(V)?
        probe_model(model, batches.next(0, 0)[0], sequence_loss, data, log, optimizer,   # what a correct
                    0.0 if cfg["overfit_batches"] else cfg["label_smoothing"],            # model does
                    step=probe_step(model, data, cfg, rt), evaluate=evaluate,
                    batches=None if cfg["overfit_batches"] or rt.world_size > 1 else batches)
    with RunClock(rt, run, cfg) as clock:       # runtime.py: the time budget; Ctrl-C and SIGTERM only noted
        while True:
            signalled = clock.tick(run)         # run.minutes moved on; 'received SIGINT' after a Ctrl-C
            epochs = batches.epochs_done(run.epoch, run.batch_in_epoch)
            stop = signalled or stop_reason(run, epochs, cfg)
            if stop:
                break
            with clock.training():
                lr, micro_batches, out = loop_step(model, optimizer, batches, run, epochs, cfg, rt, penalty)
            if out["update"] == "skipped":
                count_bad_step(run, lr, out, log)
                continue
            run.step, run.bad_steps = run.step + 1, 0
            steps_log.add(run, lr, out, micro_batches, run_progress(run.step, epochs, run.time_progress, cfg))
            if run.step % cfg["log_interval"] == 0 or run.step == 1:
                steps_log.write(run, epochs, lr, out, penalty_values())
            if cfg["average_last"] > 1 and rt.master and run.step % (cfg["average_every"] or cfg["eval_interval"]) == 0:
                take_snapshot(model, data, cfg, run.step)      # before validating: a kill between redoes both
            if run.step % cfg["eval_interval"] == 0:
                with steps_log.paused():                        # tokens/s: training time only
                    save(validate(model, data, cfg, rt, run, log, penalty_values()))
    steps_log.close()
    log.say(f"stopping: {stop}")
    if signalled:
        save()
        log.say(f"saved {os.path.join(cfg['out_dir'], 'ckpt.pt')}; continue with --init_from=resume")
        return run
    if run.step % cfg["eval_interval"]:                           # the final evaluation and checkpoint
        save(validate(model, data, cfg, rt, run, log, penalty_values()))
    if cfg["average_last"] > 1 and rt.master:                     # avg.pt: the mean of the last snapshots
        averaged = write_average(model, data, cfg, run.step)
        validate(model_from_checkpoint(averaged)[0].to(rt.device), data, cfg, rt, run, log,
                 {"snapshots": len(averaged["averaged"])}, kind="average")
    return run


# -----------------------------------------------------------------------------

def build_model(cfg: dict, src_tok, tgt_tok, verbose: bool = True):
    """A new model of the `arch` knob, its vocabularies those of the tokenizers."""
    if cfg["tie_embeddings"] not in ("all", "output", "none"):
        raise ConfigError(f"tie_embeddings='{cfg['tie_embeddings']}' is not known: use 'all', 'output' or 'none'")
    if cfg["tie_embeddings"] == "all" and src_tok is not tgt_tok:
        raise ConfigError("tie_embeddings='all' needs joint_vocab=True (one vocabulary for both sides); "
                          "use --tie_embeddings=output with separate vocabularies")
    # pad_id is the source's: it builds the source mask (the target side needs only the causal mask)
    shared = dict(src_vocab=src_tok.vocab_size, tgt_vocab=tgt_tok.vocab_size, pad_id=src_tok.pad_id,
                  n_enc_layer=cfg["n_enc_layer"], n_dec_layer=cfg["n_dec_layer"], dropout=cfg["dropout"],
                  tie_output=cfg["tie_embeddings"] != "none", share_src_tgt=cfg["tie_embeddings"] == "all")
    if cfg["arch"] not in ("transformer", "rnn"):
        raise ConfigError(f"arch='{cfg['arch']}' is not known: use 'transformer' or 'rnn'")
    inner = cfg["dropout"] if cfg["inner_dropout"] else 0.0
    try:                        # (the constructors check their knobs: d_model divisible by n_head, ...)
        model = Transformer(TransformerConfig(**shared, d_model=cfg["d_model"], n_head=cfg["n_head"], d_ff=cfg["d_ff"],
                                              attn_dropout=inner, ff_dropout=inner, pre_norm=cfg["pre_norm"],
                                              attn_impl=cfg["attn_impl"]), verbose) if cfg["arch"] == "transformer" \
            else Seq2SeqRNN(RNNConfig(**shared, **{k: cfg[k] for k in rnn_knobs}), verbose)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return speed_up(model)      # speed.py: nn.Dropout -> FastDropout (the same dropout, cheaper on a CPU)


def main(argv: list[str] | None = None) -> RunState:
    """Train as the knobs say."""
    cfg = dict(DEFAULTS)
    here = os.path.dirname(os.path.abspath(__file__))
    given = configure(cfg, argv, doc_files=(__file__, os.path.join(here, "data.py"), os.path.join(here, "model_rnn.py")))
    resume = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt")) if cfg["init_from"] == "resume" else None
    if resume is not None:
        cfg = resumed_config(DEFAULTS, given, resume, cfg["out_dir"])
    if bad := [k for k in POSITIVE if cfg[k] <= 0]:
        raise ConfigError(f"{bad[0]}={cfg[bad[0]]} must be positive (python train.py -h shows its default)")
    rt = setup(cfg["device"], cfg["dtype"])
    # a run from a checkpoint (resume, or fine-tuning one, e.g. a pruned model) takes its model and tokenizers
    source = resume if resume is not None or cfg["init_from"] == "scratch" else load_checkpoint(cfg["init_from"])
    if rt.master:                           # refuse to write over another run, or beside a live one
        claim_run_dir(cfg["out_dir"], new_run=resume is None, overwrite=cfg["overwrite"],
                      hint="continue it with --init_from=resume, ", start="" if source is None else cfg["init_from"])
    tokenizers = pair_from_state(source["tokenizers"]) if source is not None else None
    with rt.master_first():                 # (process 0 first: it writes the data cache that the others read)
        data = load_data(DataConfig.of(cfg), verbose=rt.master, tokenizers=tokenizers)
    if cfg["overfit_batches"]:              # overfitting: no dropout, also in a checkpoint's model
        cfg["dropout"] = 0.0
        source = source and {**source, "model_config": {k: 0.0 if "dropout" in k else v
                                                        for k, v in source["model_config"].items()}}
        if rt.master and resume is None:
            print(f"overfit mode: the first {cfg['overfit_batches']} batch(es), same order every epoch, dropout 0 "
                  "and label smoothing 0: the loss should fall near zero")
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, data.src_tok, data.tgt_tok, verbose=rt.master) if source is None \
        else model_from_checkpoint(source, verbose=rt.master)[0]
    if rt.master:
        print(rt)                           # device cpu, dtype float32, 1 process(es)
    model.to(rt.device)
    try:
        run = train_loop(model, make_optimizer(model, cfg), data, cfg, rt, resume)
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
    run_process(main_guard, main, DataError)    # main_guard(main, DataError); under torchrun, the process
    #                                             ended without the interpreter's teardown (runtime.py)
