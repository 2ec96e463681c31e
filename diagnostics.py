"""
Diagnostics: warnings in train.py's log that name a classic seq2seq bug, each with its likely
cause and its fix: a line "warning: ..." and a record {"kind": "warning", "name": ...} of log.jsonl.
train_loop wires them in, by when they look:

    check_initial_loss, probe_model   before step 1: the untrained model and the loss, on the first batch
    StepChecks    in common.StepLog, at every log line: the weights and gradients; in overfit mode, every batch
    Symptoms      in common.RunLog, at every record: the loss against ln(V), validation loss against BLEU
docs/debugging.md: the bugs they name (tools/bugs.py) and their cost. Leaves out: statistics of
activations, a learning-rate finder, checks of the data pipeline.
"""

import math

import torch

from decoding import translate


@torch.no_grad()
def check_initial_loss(model, batch: tuple, loss_fn, data, log, amp) -> None:
    """An untrained model should be as unsure as uniform guessing: loss close to ln(V) (with logits of
    unit variance, ~0.5 nats above it whatever V is). Far above: over-confident first guesses (weights
    too large, a wrong output layer); below: the model sees the word it must predict (a leaking mask)
    or the loss is divided by the wrong count. docs/robustness.md says why the tolerance is 1 nat.
    Logs an "init" record (step 0's loss and ln(V)), which Symptoms reads."""
    pad_id, device = data.tgt_tok.pad_id, next(model.parameters()).device
    model.eval()
    src, tgt_in, tgt_out = (t.to(device) for t in batch)
    with amp:
        loss = (loss_fn(model(src, tgt_in), tgt_out, pad_id, 0.0) / (tgt_out != pad_id).sum()).item()
    model.train()
    ln_v = math.log(data.tgt_tok.vocab_size)
    log.record("init", f"step 0: loss {loss:.3f}, ln(V) = {ln_v:.3f} ({loss - ln_v:+.2f} nats)",
               step=0, loss=loss, ln_v=ln_v)
    if abs(loss - ln_v) > 1.0:
        log.warn("initial_loss", "the initial loss is more than 1 nat away from ln(V): check the weight "
                 "initialisation, the output layer and the loss masking")


@torch.no_grad()
def probe_model(model, batch: tuple, loss_fn, data, log, rows: int = 4) -> None:
    """Before step 1, try the untrained model on a few sentences of the first batch (src, tgt_in,
    tgt_out) for bugs that training would hide, and warn (log.warn) about each found:
      causal_mask          a changed last target token changes the logits of earlier positions
      padding_mask         extra padding after each source sentence changes the logits
      padding_in_loss      padded target positions cost something in loss_fn (train.py's loss)
      attention_scale      the attention scores spread far more than 1 / sqrt(Dh) makes them
      dropout_in_decoding  two greedy decodings of the same sentences differ (model.eval() missing)
    A few forward passes in full precision and two greedy decodings of 3 sentences."""
    was_training, device = model.training, next(model.parameters()).device
    src, tgt_in, tgt_out = (t[:rows].to(device) for t in batch)
    pad, tgt_pad, V = data.src_tok.pad_id, data.tgt_tok.pad_id, data.tgt_tok.vocab_size
    model.eval()
    logits = model(src, tgt_in)                                     # (B, T, V)
    changed = torch.cat([tgt_in[:, :-1], (tgt_in[:, -1:] + 1) % V], dim=1)
    if tgt_in.shape[1] > 1 and differ(model(src, changed)[:, :-1], logits[:, :-1]):
        log.warn("causal_mask", "changing the last target token changed the predictions for earlier positions: "
                 "the decoder sees the future. Mask decoder self-attention causally (query t sees keys 0..t).")
    if differ(model(torch.cat([src, torch.full_like(src[:, :3], pad)], dim=1), tgt_in), logits):
        log.warn("padding_mask", "three more padding tokens after each source sentence changed the predictions: "
                 "attention reads padding, and a sentence is translated differently in a batch than alone. "
                 "Mask padded keys (src != pad) in encoder self-attention and cross-attention.")
    if loss_fn(logits, torch.full_like(tgt_out, tgt_pad), tgt_pad, 0.0).item() != 0.0:
        log.warn("padding_in_loss", "the training loss of targets that are all padding is not 0: padded positions "
                 "count in the loss and its average. Leave out the positions where tgt_out is pad.")
    spread = attention_spread(model.attention_weights(src, tgt_in)) if hasattr(model, "attention_weights") else 0.0
    if spread > 1.5:
        log.warn("attention_scale", f"the untrained model's attention scores spread with a standard deviation of "
                 f"{spread:.1f} (~0.6 when scaled): softmax picks nearly one key and passes little gradient. "
                 "Divide Q K^T by sqrt(Dh) before the softmax; check the weight initialisation.")
    model.train()                                                   # as validation finds it during training
    texts = data.splits["validation"].src_text[:3]
    if translate(model, data.src_tok, data.tgt_tok, texts, device=device) != \
            translate(model, data.src_tok, data.tgt_tok, texts, device=device):
        log.warn("dropout_in_decoding", "greedy decoding of the same 3 validation sentences twice gave different "
                 "translations: dropout is on while decoding. Call model.eval() before decoding or validating, "
                 "and model.train() after.")
    model.train(was_training)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of logits differ by more than float rounding (0.1% of their scale)."""
    return (a - b).abs().max().item() > 1e-3 * (1.0 + a.abs().max().item())


def attention_spread(weights: dict[str, list[torch.Tensor]]) -> float:
    """How widely the attention scores of a query spread over the keys it may see, read back from
    the weights (log softmax = the scores less a constant per query): their standard deviation,
    averaged over queries. ~0.6 at this project's initialisation whatever D and H; sqrt(Dh) times
    that without / sqrt(Dh). weights: {kind: [(B, H, T, S) per layer]}, masked keys at 0."""
    spreads = [torch.zeros(0)]
    for w in (w for layers in weights.values() for w in layers if w.numel()):
        seen = w > 0                                                # (B, H, T, S) the keys a query may see
        n = seen.sum(dim=-1)                                        # (B, H, T)
        scores = torch.where(seen, w.log(), 0.0)
        centred = torch.where(seen, scores - scores.sum(dim=-1, keepdim=True) / n.clamp_min(1)[..., None], 0.0)
        spreads.append((centred.pow(2).sum(dim=-1) / (n - 1).clamp_min(1)).sqrt()[n > 1])
    spreads = torch.cat(spreads)
    return spreads.mean().item() if spreads.numel() else 0.0


class StepChecks:
    """What common.StepLog has checked at each log line and, in overfit mode (overfit > 0), at each
    step; each warning once per run:
      gradients_kept          a parameter still holds a gradient after the update
      weights_grow            in the first 500 steps, the weight matrices grew to 1.5x their norm
      overfit_batches_change  in overfit mode, the batch at a position differs from the first epoch's"""

    def __init__(self, log, model, overfit: int = 0):
        self.log, self.overfit, self.warned, self.first_norm, self.first_batches = log, overfit, set(), 0.0, {}
        self.params = [p for p in model.parameters() if p.requires_grad]

    def warn_once(self, name: str, text: str, step: int) -> None:
        if name not in self.warned:
            self.warned.add(name)
            self.log.warn(name, text, step)

    def at_step(self, run, batches: list) -> None:
        if self.overfit:
            self.same_batches(run, batches)

    def at_log_line(self, step: int, lr: float) -> None:
        self.gradients_cleared(step)
        self.weight_growth(step, lr)

    def gradients_cleared(self, step: int) -> None:
        """After the update, no parameter should hold a gradient (train.update ends with zero_grad)."""
        if any(p.grad is not None for p in self.params):
            self.warn_once("gradients_kept", f"step {step}: the parameters still hold gradients after the update: "
                           "backward() adds to them, so each step follows the sum of all the steps' gradients "
                           "before it. Call optimizer.zero_grad(set_to_none=True) once per step, after "
                           "optimizer.step().", step)

    def weight_growth(self, step: int, lr: float) -> None:
        """The weight matrices' norm against the first log line's (step 1, whose learning rate is 0):
        up 3% after 260 steps of config/transformer_multi30k.py, 13% after 180 of the GRU's
        config/rnn_attn_en_de.py; at 20x its learning rate, the toy's Transformer grew 50-70% in 50
        steps. Early in a run, half again means updates far too large for the weights."""
        if step > 500:                      # watched early only: no norm (and no read-back) after that
            return
        norm = torch.nn.utils.get_total_norm([p for p in self.params if p.dim() >= 2]).item()
        self.first_norm = self.first_norm or norm
        if norm > 1.5 * self.first_norm:
            self.warn_once("weights_grow", f"step {step}: the weight matrices have grown to "
                           f"{norm / self.first_norm:.1f}x their norm at the start (lr {lr:.2e}); healthy runs grow a "
                           "few % in their first hundreds of steps. The updates are far too large: lower "
                           "learning_rate 10x (with Adam, clipping the gradients does not shrink the steps).", step)

    def same_batches(self, run, batches: list) -> None:
        """Overfit mode trains on the same batches every epoch: the batch at a position must not change."""
        seen = hash(tuple(t.numpy().tobytes() for batch in batches for t in batch))
        if self.first_batches.setdefault(run.batch_in_epoch, seen) != seen:
            self.warn_once("overfit_batches_change", f"step {run.step}: overfit mode, but the batch at position "
                           f"{run.batch_in_epoch} of epoch {run.epoch} is not the one the first epoch had there: "
                           "the loss cannot fall near zero on batches that change. Take the first "
                           "overfit_batches batches unshuffled, the same every epoch.", run.step)


class Symptoms:
    """What a run's records say about it. common.RunLog shows it every record it writes; it returns
    the warnings they call for, each (name, text) once per run:
      loss_stuck            past the warm-up (the learning rate falling) and step 100, the training
                            loss has not fallen 1 nat below ln(V), uniform guessing. A softmax before the
                            cross-entropy cannot: its loss is >= ln(e + V - 1) - 1 > ln(V) - 1.
      teacher_forcing_leak  validation loss below 0.35 nats, yet greedy BLEU below 10: the model is
                            right when it is shown the target, wrong when it must decode on its own."""

    def __init__(self):
        self.ln_v, self.top_lr, self.named = None, 0.0, set()

    def __call__(self, kind: str, r: dict) -> list[tuple[str, str]]:
        found = []
        if kind == "init":
            self.ln_v = r["ln_v"]
        elif kind == "train" and self.ln_v is not None:
            past_warmup, self.top_lr = r["lr"] < self.top_lr, max(self.top_lr, r["lr"])
            if past_warmup and r["step"] >= 100 and r["loss"] > self.ln_v - 1.0:
                found.append(("loss_stuck", f"step {r['step']}: past the warm-up, the training loss "
                              f"{r['loss']:.2f} has not fallen 1 nat below ln(V) = {self.ln_v:.2f}, uniform guessing. "
                              "Check that the loss gets raw logits (no softmax before the cross-entropy), that the "
                              "optimizer steps the model's parameters, and the learning rate."))
        elif kind == "eval" and r["val_loss"] < 0.35 and r["bleu"] < 10:
            found.append(("teacher_forcing_leak", f"step {r['step']}: validation loss {r['val_loss']:.2f} (nearly "
                          f"always right when shown the target) but greedy BLEU {r['bleu']:.1f}: the decoder sees "
                          "the word it has to predict. Check the causal mask of decoder self-attention and that "
                          "tgt_in is tgt_out shifted right by one (<bos> first)."))
        found = [(name, text) for name, text in found if name not in self.named]
        self.named.update(name for name, _ in found)
        return found
