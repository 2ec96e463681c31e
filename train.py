"""
Train a translation model: `python train.py config/transformer_multi30k.py [--key=value ...]`.

One loop for every model (arch = 'transformer' | 'rnn' is read only to construct it): token-
budget batches from data.py, AdamW with a one-cycle learning rate (linear warm-up, cosine or
linear decay), label smoothing, gradient clipping and accumulation, bf16 autocast on CPU / fp16
with GradScaler on CUDA, validation loss + greedy BLEU/chrF, self-contained atomic checkpoints
that resume exactly, DDP under torchrun. It also shows what goes wrong early: the loss at step 0
next to ln(V), gradient norms per module, an overfit-one-batch mode and toy copy/reverse tasks.
prune.py reuses `train_loop` with an extra penalty. Leaves out: model averaging, early stopping.
"""

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields

import torch

from configurator import ConfigError, configure, main_guard
from batching import collate, make_batches
from data import DATA_KEYS, DataConfig, DataError, load_data
from checkpoint import build_model, load_checkpoint, model_classes, model_from_checkpoint, save_checkpoint
from decoding import score, translate
from loss import sequence_loss
from runlog import RunLog, SpikeWatch, plot_log, printable
from tokenizer import pair_state

# -----------------------------------------------------------------------------
# knobs: defaults here, overridden by config/<name>.py, then by --key=value
# I/O
out_dir = "out"  # run folder: ckpt.pt (latest), best.pt (best validation BLEU), log.jsonl, plots
init_from = "scratch"  # 'scratch', 'resume' (continue out_dir/ckpt.pt), or a checkpoint path to fine-tune
log_interval = 50  # steps between log lines
eval_interval = 500  # steps between validation runs (loss, BLEU) and checkpoints
eval_sentences = 500  # validation sentences decoded for BLEU (0 = all)
eval_beam = 1  # beam size for validation BLEU: 1 = greedy (fast); beam search is slower and scores higher
plot = True  # draw plots.png (loss, learning rate, gradient norm, BLEU) from log.jsonl at the end
seed = 1337  # seeds the weights, dropout and batch order
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = "auto"  # 'auto' (bf16 where fast, fp16 on older GPUs), 'bfloat16', 'float16', 'float32'
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
# model
arch = "transformer"  # 'transformer' or 'rnn'
d_model = 256  # model width D
n_head = 4  # attention heads H
n_enc_layer = 3  # encoder layers
n_dec_layer = 3  # decoder layers
d_ff = 1024  # feed-forward hidden width
dropout = 0.1  # dropout on embeddings, attention weights, sub-layer outputs
pre_norm = True  # LayerNorm before each sub-layer (stable); False = post-LN as in Vaswani et al.
tie_embeddings = "all"  # 'all' (source = target = output, needs joint_vocab), 'output', or 'none'
attn_impl = "math"  # 'math' (explicit softmax) or 'sdpa' (F.scaled_dot_product_attention)
# model: rnn (model_rnn.py); n_enc_layer, n_dec_layer, dropout and tie_embeddings apply to it too
emb_dim = 256  # RNN embedding width
hidden_size = 512  # RNN GRU state width
bidirectional = False  # RNN encoder reads the source in both directions
attention = "none"  # RNN attention: 'none' (bottleneck), 'dot' (Luong), 'additive' (Bahdanau)
teacher_forcing = 1.0  # RNN: probability of feeding the true previous token in training
# optimisation
learning_rate = 1e-3  # peak learning rate of the one-cycle schedule
min_lr = 1e-5  # learning rate at the end of the decay
warmup_frac = 0.3  # share of the run spent warming up linearly from 0 to learning_rate
decay = "cosine"  # decay after the warm-up: 'cosine', 'linear' or 'exp' (geometric, to min_lr)
weight_decay = 0.01  # AdamW decoupled weight decay
beta1 = 0.9  # AdamW beta1
beta2 = 0.98  # AdamW beta2
grad_clip = 1.0  # clip the total gradient norm to this (0 = off)
label_smoothing = 0.1  # epsilon of label smoothing (Szegedy et al. 2016)
grad_accum = 1  # batches per optimizer step
max_bad_steps = 10  # stop after this many non-finite losses/gradients in a row
spike_factor = 2.0  # warn when a step's loss exceeds this multiple of its running mean (0 = off)
# stopping: whichever is reached first; the learning-rate schedule spans the limits that are set
max_iters = 0  # optimizer steps (0 = no limit)
max_epochs = 0.0  # passes over the training data (0 = no limit)
max_minutes = 0.0  # wall-clock training budget (0 = no limit)
# debugging
overfit_batches = 0  # > 0: train on the first N batches only, unshuffled, no dropout or smoothing
# -----------------------------------------------------------------------------


def knobs() -> dict:
    """The training knobs above, as a dict (after configure() has overridden them)."""
    g = globals()
    return {k: g[k] for k in TRAIN_KEYS}


TRAIN_KEYS = [k for k, v in list(globals().items())
              if not k.startswith("_") and type(v) in (bool, int, float, str)]


# -----------------------------------------------------------------------------
# building blocks

def model_config_from(cfg: dict, src_tok, tgt_tok) -> dict:
    """Model constructor arguments: the knobs whose names the model's config class has, plus the vocabularies."""
    _, config_class = model_classes(cfg["arch"])
    if cfg["tie_embeddings"] not in ("all", "output", "none"):
        raise ConfigError(f"tie_embeddings='{cfg['tie_embeddings']}' is not known: use 'all', 'output' or 'none'")
    if cfg["tie_embeddings"] == "all" and src_tok is not tgt_tok:
        raise ConfigError("tie_embeddings='all' needs joint_vocab=True (one vocabulary for both sides); "
                          "use --tie_embeddings=output with separate vocabularies")
    names = {f.name for f in fields(config_class)}
    return {**{k: v for k, v in cfg.items() if k in names},
            # pad_id is the source's: it builds the source mask (the target side needs only the causal mask)
            "src_vocab": src_tok.vocab_size, "tgt_vocab": tgt_tok.vocab_size, "pad_id": src_tok.pad_id,
            "tie_output": cfg["tie_embeddings"] != "none", "share_src_tgt": cfg["tie_embeddings"] == "all"}


def setup_device(device_knob: str, dtype_knob: str):
    """Returns (device, autocast context, GradScaler or None, dtype name)."""
    if device_knob == "auto":
        device_knob = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device_knob.startswith("cuda") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device='{device_knob}' but CUDA is not available here: use --device=cpu")
    if dtype_knob == "auto":
        # bf16 runs on CPU AMX units 1.3-1.5x faster than fp32 (README) and needs no loss scaling
        bf16_ok = device_type == "cpu" or torch.cuda.is_bf16_supported()
        dtype_knob = "bfloat16" if bf16_ok else "float16"
    if dtype_knob not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype='{dtype_knob}' is not known: use auto, float32, bfloat16 or float16")
    if dtype_knob == "float16" and device_type == "cpu":
        raise ConfigError("dtype='float16' is for CUDA; on CPU use bfloat16 or float32")
    amp = (contextlib.nullcontext() if dtype_knob == "float32"
           else torch.autocast(device_type, dtype=getattr(torch, dtype_knob)))
    # fp16 has a narrow range: GradScaler multiplies the loss so small gradients do not underflow,
    # and skips steps whose gradients overflowed
    scaler = torch.amp.GradScaler("cuda") if dtype_knob == "float16" else None
    return device_knob, amp, scaler, dtype_knob


def lr_at(progress: float, cfg: dict) -> float:
    """One-cycle schedule (Smith 2018): warm up linearly, then anneal to min_lr.

    progress p in [0, 1], warm-up share w:   lr = peak * p / w                      for p < w
      cosine: lr = min + (peak - min) * (1 + cos(pi * (p - w) / (1 - w))) / 2       for p >= w
      linear: lr = min + (peak - min) * (1 - (p - w) / (1 - w))
      exp:    lr = peak * (min / peak) ** ((p - w) / (1 - w))    (exponential decay)
    """
    peak, low, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]
    if progress < w:
        return peak * progress / w
    x = min(1.0, (progress - w) / max(1e-9, 1 - w))
    if cfg["decay"] == "linear":
        return low + (peak - low) * (1 - x)
    if cfg["decay"] == "exp":
        return peak * (low / peak) ** x
    if cfg["decay"] == "cosine":
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * x))
    raise ConfigError(f"decay='{cfg['decay']}' is not known: use 'cosine', 'linear' or 'exp'")


def run_progress(step: int, epoch_float: float, minutes: float, cfg: dict) -> float:
    """How far the run is, in [0, 1]: the furthest of the limits that are set."""
    parts = [step / cfg["max_iters"] if cfg["max_iters"] else 0.0,
             epoch_float / cfg["max_epochs"] if cfg["max_epochs"] else 0.0,
             minutes / cfg["max_minutes"] if cfg["max_minutes"] else 0.0]
    return min(1.0, max(parts))


def grad_norms(model) -> dict:
    """L2 norm of the gradients: total, encoder side (names starting enc/src), decoder side (the rest)."""
    groups = {"enc": [], "dec": []}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups["enc" if name.startswith(("enc", "src")) else "dec"].append(p.grad.detach().float().norm())
    norms = {k: torch.stack(v).norm().item() if v else 0.0 for k, v in groups.items()}
    norms["total"] = math.sqrt(norms["enc"] ** 2 + norms["dec"] ** 2)
    return norms


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, data, batch_tokens: int, device: str, amp, split: str = "validation",
             n_sentences: int = 0, n_examples: int = 3, beam: int = 1) -> dict:
    """Loss/perplexity over the whole split, BLEU/chrF on its first n_sentences (0 = all),
    greedy or with beam search (length penalty alpha 0.6)."""
    was_training = model.training
    model.eval()
    sp = data.splits[split]
    loss_sum, n_tokens = 0.0, 0
    for idx in make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False):
        src, tgt_in, tgt_out = (t.to(device) for t in collate(sp, idx, data.src_tok, data.tgt_tok))
        with amp:
            logits = model(src, tgt_in)
        loss_sum += sequence_loss(logits, tgt_out, data.tgt_tok.pad_id, 0.0).item()
        n_tokens += int((tgt_out != data.tgt_tok.pad_id).sum())
    n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
    hyps = translate(model, data.src_tok, data.tgt_tok, sp.src_text[:n], beam=beam, device=device, amp=amp)
    scores = score(hyps, sp.tgt_text[:n])
    model.train(was_training)
    loss = loss_sum / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bleu": scores["bleu"], "chrf": scores["chrf"],
            "sentences": n, "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i], "hyp": hyps[i]}
                                         for i in range(min(n_examples, n))]}


# -----------------------------------------------------------------------------
# the training loop

class Stop(Exception):
    """Raised inside the loop to end the run cleanly (signal, repeated non-finite loss)."""


def train_loop(model, data, cfg: dict, out_dir: str, ckpt_extra: dict, state: dict | None = None,
               extra_loss=None, extra_log=None, lr_scale: dict | None = None, keep_best: bool = True,
               from_scratch: bool = True, raw_model=None, rank: int = 0, world_size: int = 1) -> dict:
    """Train `model` on `data` until a stop condition; returns the final state.

    ckpt_extra: what every checkpoint carries besides the training state (kind, model config,
    tokenizers, configs). state: the training state of a checkpoint to resume from.
    extra_loss(): an optional penalty tensor added to the loss each step (prune.py's L0 term).
    extra_log(step): extra {name: value} for each log record and eval
    (lists and dicts go to log.jsonl only, not to the printed line). lr_scale: {parameter-name
    suffix: multiplier of the learning rate} (prune.py's gates learn faster than the weights).
    keep_best: also write best.pt whenever validation BLEU improves. from_scratch: the weights
    are untrained, so check the loss at step 0 against ln(V).
    """
    raw_model = raw_model if raw_model is not None else model
    master = rank == 0
    device, amp, scaler, dtype_name = setup_device(cfg["device"], cfg["dtype"])
    pad_id = data.tgt_tok.pad_id
    overfit = cfg["overfit_batches"] > 0
    smoothing = 0.0 if overfit else cfg["label_smoothing"]
    groups = {}                               # (weight decay?, lr multiplier) -> parameters
    for name, p in raw_model.named_parameters():
        scale = next((m for suffix, m in (lr_scale or {}).items() if name.endswith(suffix)), 1.0)
        # no weight decay on biases, LayerNorm gains and gate logits (1-d parameters)
        groups.setdefault((p.dim() >= 2, scale), []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "weight_decay": cfg["weight_decay"] if decays else 0.0,
                                    "lr_scale": scale} for (decays, scale), ps in groups.items()],
                                  lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=True)
    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "minutes": 0.0, "best_bleu": -1.0, "bad_steps": 0}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        st.update({k: state[k] for k in st if k in state})

    train_split = data.splits["train"]

    def epoch_batches(epoch: int) -> list:
        if overfit:
            return make_batches(train_split.src_lens, train_split.tgt_lens, cfg["batch_tokens"],
                                shuffle=False)[:cfg["overfit_batches"]]
        return make_batches(train_split.src_lens, train_split.tgt_lens, cfg["batch_tokens"], seed=cfg["seed"],
                            epoch=epoch, pool_size=cfg["length_pool"], rank=rank, world_size=world_size)

    batches = epoch_batches(st["epoch"])
    if not batches:
        raise DataError("the training split gives no batches (fewer batches than processes?)")

    def next_batch():
        if st["batch_in_epoch"] >= len(batches):
            st["epoch"] += 1
            st["batch_in_epoch"] = 0
            batches[:] = epoch_batches(st["epoch"])
        idx = batches[st["batch_in_epoch"]]
        st["batch_in_epoch"] += 1
        return collate(train_split, idx, data.src_tok, data.tgt_tok)

    def checkpoint(path: str) -> None:
        if not master:
            return
        save_checkpoint(path, {**ckpt_extra, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict() if scaler is not None else None,
                               **{k: st[k] for k in st}})

    bar = None
    if master and sys.stderr.isatty():       # a progress bar in percent of the run (steps, epochs or minutes)
        from tqdm import tqdm
        bar = tqdm(total=100, unit="%", dynamic_ncols=True, leave=False, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
    log = RunLog(out_dir, master, bar, resume_step=st["step"] if state is not None else None)

    def run_eval() -> None:
        if master:
            ev = evaluate(raw_model, data, cfg["batch_tokens"], device, amp, n_sentences=cfg["eval_sentences"],
                          beam=cfg.get("eval_beam", 1))
            extra = extra_log(st["step"]) if extra_log is not None else {}
            log.record("eval", f"eval step {st['step']}: val loss {ev['loss']:.3f}, ppl {ev['ppl']:.2f}, "
                       f"BLEU {ev['bleu']:.2f}, chrF {ev['chrf']:.2f} ({ev['sentences']} sentences)"
                       + printable(extra, ", "),
                       step=st["step"], val_loss=ev["loss"], ppl=ev["ppl"], bleu=ev["bleu"], chrf=ev["chrf"],
                       examples=ev["examples"], **extra)
            for ex in ev["examples"]:
                log.say(f"  src: {ex['src']}\n  ref: {ex['ref']}\n  hyp: {ex['hyp']}")
            checkpoint(os.path.join(out_dir, "ckpt.pt"))
            if ev["bleu"] > st["best_bleu"]:
                st["best_bleu"] = ev["bleu"]
                if keep_best:
                    checkpoint(os.path.join(out_dir, "best.pt"))
        if world_size > 1:
            torch.distributed.barrier()

    # SIGINT / SIGTERM: finish the current step, save, and exit instead of losing the run
    stop_signal = []
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):          # not in the main thread: keep the default
            handlers[sig] = signal.signal(sig, lambda s, f: stop_signal.append(signal.Signals(s).name))

    model.train()
    if st["step"] == 0 and master and from_scratch:   # the first sanity check: an untrained model guesses uniformly
        src, tgt_in, tgt_out = (t.to(device) for t in collate(train_split, batches[0], data.src_tok, data.tgt_tok))
        raw_model.eval()
        with torch.no_grad(), amp:
            loss0 = (sequence_loss(raw_model(src, tgt_in), tgt_out, pad_id, 0.0) /
                     (tgt_out != pad_id).sum()).item()
        raw_model.train()
        ln_v = math.log(data.tgt_tok.vocab_size)
        log.record("init", f"step 0: loss {loss0:.3f}, ln(V) = {ln_v:.3f} (ratio {loss0 / ln_v:.2f})",
                   step=0, loss=loss0, ln_v=ln_v)
        if abs(loss0 / ln_v - 1) > 0.10:
            log.say("warning: the initial loss differs from ln(V) by more than 10%: check the weight "
                    "initialisation, the output layer and the loss masking")
        if overfit:
            log.say(f"overfit mode: the first {cfg['overfit_batches']} batch(es), same order every epoch, "
                    "dropout 0 and label smoothing 0: the loss should fall near zero")

    t_start = time.time() - st["minutes"] * 60
    spikes = SpikeWatch(cfg.get("spike_factor", 0.0))
    t_last, interval = time.time(), {"loss": 0.0, "tokens": 0, "pad": 0, "cells": 0, "steps": 0}
    try:
        while True:
            minutes = (time.time() - t_start) / 60
            epoch_float = st["epoch"] + st["batch_in_epoch"] / max(len(batches), 1)
            if ((cfg["max_iters"] and st["step"] >= cfg["max_iters"])
                    or (cfg["max_epochs"] and epoch_float >= cfg["max_epochs"])
                    or (cfg["max_minutes"] and minutes >= cfg["max_minutes"])):
                break
            if stop_signal:
                raise Stop(f"received {stop_signal[0]}")
            lr = lr_at(run_progress(st["step"], epoch_float, minutes, cfg), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]

            # the random draws of a step (dropout, teacher forcing, gate noise) come from a seed
            # made of (seed, process, step): a resumed run draws what the uninterrupted run drew,
            # with no generator state to save, and each process of a distributed run draws its own
            torch.manual_seed(hash((cfg["seed"], rank, st["step"])) % 2**63)
            micro = [next_batch() for _ in range(cfg["grad_accum"])]
            n_tok = torch.tensor(float(sum(int((b[2] != pad_id).sum()) for b in micro)))
            if world_size > 1:          # normalise by the tokens of the global batch, as one process would
                torch.distributed.all_reduce(n_tok)
            loss_sum = 0.0
            for i, (src, tgt_in, tgt_out) in enumerate(micro):
                src, tgt_in, tgt_out = src.to(device), tgt_in.to(device), tgt_out.to(device)
                sync = contextlib.nullcontext() if (world_size == 1 or i == len(micro) - 1) else model.no_sync()
                with sync:
                    with amp:
                        logits = model(src, tgt_in)
                    # DDP averages gradients over processes; * world_size undoes that, so the
                    # gradient is that of the summed loss over the global batch / its tokens
                    loss = sequence_loss(logits, tgt_out, pad_id, smoothing) * world_size / n_tok
                    loss_sum += loss.item() / world_size          # the logged loss: cross-entropy only
                    if extra_loss is not None and i == 0:
                        loss = loss + extra_loss()
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                interval["pad"] += int((src == data.src_tok.pad_id).sum() + (tgt_in == pad_id).sum())
                interval["cells"] += src.numel() + tgt_in.numel()
            if world_size > 1:          # each process summed its own share of the global batch
                shares = torch.tensor(loss_sum)
                torch.distributed.all_reduce(shares)
                loss_sum = shares.item()
            if scaler is not None:
                scaler.unscale_(optimizer)
            norms = grad_norms(raw_model)
            # a non-finite loss gives non-finite gradients, and gradients agree across processes,
            # so every process takes the same decision here
            if not math.isfinite(norms["total"]):
                st["bad_steps"] += 1          # skip the update (GradScaler does this itself with fp16)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                log.say(f"step {st['step'] + 1}: non-finite loss or gradient, update skipped "
                        f"({st['bad_steps']} in a row)")
                if st["bad_steps"] >= cfg["max_bad_steps"]:
                    raise Stop(f"{st['bad_steps']} non-finite steps in a row at step {st['step'] + 1} (lr {lr:.2e}, "
                               f"gradient norm {norms['total']}). Try a lower learning_rate, grad_clip=1, "
                               "or dtype=float32.")
                continue
            st["bad_steps"] = 0
            running = spikes(loss_sum)
            if running is not None and master:
                log.say(f"warning: loss spike at step {st['step']}: {loss_sum:.3f}, running mean {running:.3f} "
                        f"(lr {lr:.2e}, gradient norm {norms['total']:.2f}). If it repeats or the loss stays "
                        "up: lower learning_rate, longer warmup_frac, grad_clip=1.")
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            st["step"] += 1
            st["minutes"] = (time.time() - t_start) / 60
            interval["loss"] += loss_sum
            interval["tokens"] += int(n_tok.item())
            interval["steps"] += 1
            if bar is not None:
                bar.n = round(100 * run_progress(st["step"], epoch_float, st["minutes"], cfg), 1)
                bar.refresh()

            if st["step"] % cfg["log_interval"] == 0 or st["step"] == 1:
                dt = time.time() - t_last
                extra = extra_log(st["step"]) if extra_log is not None else {}
                rec = dict(step=st["step"], epoch=round(epoch_float, 3), loss=interval["loss"] / interval["steps"],
                           lr=lr, gnorm=norms["total"], gnorm_enc=norms["enc"], gnorm_dec=norms["dec"],
                           tok_per_s=interval["tokens"] / max(dt, 1e-9),
                           pad=interval["pad"] / max(interval["cells"], 1), minutes=st["minutes"], **extra)
                log.record("train", f"step {rec['step']:>6} | epoch {rec['epoch']:6.2f} | loss {rec['loss']:.4f} | "
                           f"lr {lr:.2e} | gnorm {rec['gnorm']:.2f} (enc {rec['gnorm_enc']:.2f} dec "
                           f"{rec['gnorm_dec']:.2f}) | {rec['tok_per_s']:,.0f} tok/s | pad {rec['pad']:.1%} | "
                           f"{rec['minutes']:.1f} min" + printable(extra, " | "), **rec)
                t_last, interval = time.time(), {k: 0 for k in interval}
            if st["step"] % cfg["eval_interval"] == 0:
                run_eval()
    except Stop as reason:
        log.say(f"stopping: {reason}")
        if "non-finite" not in str(reason):
            checkpoint(os.path.join(out_dir, "ckpt.pt"))
            log.say(f"saved {os.path.join(out_dir, 'ckpt.pt')}; continue with --init_from=resume")
        st["stopped"] = str(reason)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
    if "stopped" not in st and st["step"] % cfg["eval_interval"] != 0:
        run_eval()                       # the final evaluation and checkpoint
    return st


# -----------------------------------------------------------------------------

def data_config_from(cfg: dict) -> DataConfig:
    return DataConfig(**{k: cfg[k] for k in DATA_KEYS})


def setup_distributed():
    """(rank, world_size): torchrun sets RANK/WORLD_SIZE; gloo on CPU, nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    given = configure(globals(), doc_files=(__file__,))
    cfg = knobs()
    state = None
    if cfg["init_from"] == "resume":
        state = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        # the run goes on with its own configuration; stop conditions, intervals and the device
        # may be changed by naming them (e.g. --max_minutes=60 to extend a run)
        may_change = ("max_iters", "max_epochs", "max_minutes", "eval_interval", "log_interval", "device", "plot")
        cfg = {**state["train_config"], **{k: v for k, v in given.items() if k in may_change},
               "init_from": "resume"}
    if not (cfg["max_iters"] or cfg["max_epochs"] or cfg["max_minutes"]):
        raise ConfigError("no stop condition: set max_iters, max_epochs or max_minutes (e.g. --max_minutes=30)")
    rank, world_size = setup_distributed()
    if world_size > 1 and cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if cfg["overfit_batches"]:
        cfg["dropout"] = 0.0
    if rank == 0:
        try:
            os.makedirs(cfg["out_dir"], exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create out_dir '{cfg['out_dir']}': {e.strerror or e}. "
                              "Choose another --out_dir.") from None

    data = load_data(data_config_from(cfg), verbose=rank == 0)

    torch.manual_seed(cfg["seed"])
    if state is not None:
        model, data.src_tok, data.tgt_tok = model_from_checkpoint(state, verbose=rank == 0)
        kind, model_config = state["kind"], state["model_config"]
    elif cfg["init_from"] != "scratch":            # fine-tune from another checkpoint (e.g. a pruned one)
        source = load_checkpoint(cfg["init_from"])
        model, data.src_tok, data.tgt_tok = model_from_checkpoint(source, verbose=rank == 0)
        kind, model_config = source["kind"], source["model_config"]
    else:
        kind, model_config = cfg["arch"], model_config_from(cfg, data.src_tok, data.tgt_tok)
        model = build_model(kind, model_config, verbose=rank == 0)
    device, _, _, dtype_name = setup_device(cfg["device"], cfg["dtype"])
    model.to(device)
    if rank == 0:
        print(f"device {device}, dtype {dtype_name}, {world_size} process(es)")
    ckpt_extra = {"kind": kind, "model_config": model_config,
                  "tokenizers": pair_state(data.src_tok, data.tgt_tok),
                  "data_config": asdict(data_config_from(cfg)), "train_config": cfg}
    wrapped = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device] if device.startswith("cuda") else None)
    st = train_loop(wrapped, data, cfg, cfg["out_dir"], ckpt_extra, state, raw_model=model,
                    from_scratch=cfg["init_from"] == "scratch", rank=rank, world_size=world_size)
    if rank == 0:
        plots = f"; plots in {plot_log(cfg['out_dir'])}" if cfg.get("plot", True) else ""
        print(f"done: {st['step']} steps, {st['minutes']:.1f} min, best validation BLEU {st['best_bleu']:.2f}{plots}")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if "stopped" in st and "non-finite" in st["stopped"]:
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main, DataError)
