"""
Watching a run: warnings in train.py's log for a run that goes wrong as it goes, each with its
likely cause and its fix, once per run (diagnostics.py tests the untrained model before step 1).

    StepChecks    in common.StepLog, at every log line: the weights and gradients, the optimizer's rate
                  and step count, the training mode, one update's size; at every step: the batch moving
                  on (in overfit mode: staying the same)
    Symptoms      in common.RunLog, at every record: the loss against ln(V), the learning rate's schedule,
                  validation loss against BLEU, what its source is worth to the model, the translations' length
docs/debugging.md: what each fires on and why its threshold, the bugs they name, their cost. Leaves
out: statistics of activations, a learning-rate finder.
"""

import math

import torch

from locate import module_names


class StepChecks:
    """What common.StepLog has checked at each log line and at each step; each warning once per run:
      gradients_kept          a parameter still holds a gradient after the update
      weights_grow            in the first 500 steps, the weight matrices grew to 1.5x their norm
      weights_shrink          ... or shrank to half of it
      weights_frozen          from step 100 to 500, a trainable parameter has not changed since step 1
      lr_not_applied          the optimizer's rate is not the schedule's (the one logged)
      optimizer_steps         since the first log line, Adam's own step count did not move, or moved more
                              than the loop's
      step_count              the step counter moves by other than 1 in one turn of the loop
      overfit_batches_change  in overfit mode, the batch at a position differs from the first epoch's
      batch_repeated          otherwise, a step's batch is the step before's, in the same epoch
      update_ratio            once, the step after the first log line from step 100 on past the warm-up:
                              a module's weight matrices moved by more than a tenth of their size in one
                              update, or by less than a millionth but not 0 (the usual: 1e-4 to 1e-2); or,
                              in a run from scratch near its peak rate (peak_lr), the median module under 1e-4
      training_mode           the model steps in eval mode (dropout off) though it has dropout"""

    def __init__(self, log, model, overfit: int = 0, optimizer=None, peak_lr: float = 0.0):
        self.log, self.overfit, self.warned, self.first_norm, self.first_batches = log, overfit, set(), 0.0, {}
        self.optimizer = optimizer
        self.last_batch, self.last_step = (-1, torch.zeros(0)), None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()]
        self.names, self.params, self.first_sums = [n for n, _ in named], [p for _, p in named], []
        self.before: list[torch.Tensor] | None = None           # the weights before the update measured
        self.counted: tuple[int, int] | None = None             # (the loop's step, Adam's) at the first log line
        self.model, self.last_lr, self.peak_lr = model, 0.0, peak_lr    # (peak_lr: a run from scratch's; 0: none)
        self.near_peak = False                                  # the update measured: at half the peak rate or more
        self.dropout = any(getattr(m, "p", 0) > 0 if "Dropout" in type(m).__name__ else    # (speed.FastDropout
                           isinstance(m, torch.nn.RNNBase) and m.dropout > 0 for m in model.modules())  # too)

    def warn_once(self, name: str, text: str, step: int) -> None:
        if name not in self.warned:
            self.warned.add(name)
            self.log.warn(name, text, step)

    def at_step(self, run, batches: list) -> None:
        if self.last_step is not None and run.step != self.last_step + 1:
            self.warn_once("step_count", f"step {run.step}: the step counter moved from {self.last_step} to "
                           f"{run.step} in one turn of the loop: it counts something else than the updates, so "
                           "the schedule (fed the run's progress), the log and the stop limits run ahead of the "
                           "training. Advance run.step once per optimizer step, in one place.", run.step)
        self.last_step = run.step
        if self.before:
            self.update_ratio(run.step)
        if self.overfit:
            self.same_batches(run, batches)
        else:
            self.batch_repeated(run, batches)

    def at_log_line(self, step: int, lr: float) -> None:
        self.gradients_cleared(step)
        self.weight_growth(step, lr)
        self.rate_applied(step, lr)
        self.optimizer_steps(step)
        self.training_mode(step)
        past_warmup = 0 < lr <= self.last_lr                    # (the rate no longer rising: at its peak or after)
        if step >= 100 and past_warmup and self.before is None:     # the next step's update is measured
            self.before = [p.detach().clone() for p in self.params]
            self.near_peak = lr >= 0.5 * self.peak_lr > 0
        self.last_lr = lr

    def update_ratio(self, step: int) -> None:
        """Each module's update against its weights, its matrices' norms (Karpathy's rule of thumb:
        about 1e-3). With Adam each weight moves by up to about the learning rate per step, so the ratio
        is about lr over the weights' typical size: a module 100x outside the usual range has a
        learning rate of its own that is wrong, gradients under Adam's eps, or weights far from their
        initial scale."""
        moved, size = {}, {}
        for name, p, old in zip(self.names, self.params, self.before):
            if p.dim() >= 2:
                module = name.rsplit(".", 1)[0]
                moved[module] = moved.get(module, 0.0) + (p.detach() - old).float().pow(2).sum().item()
                size[module] = size.get(module, 0.0) + old.float().pow(2).sum().item()
        self.before = []                                        # measured: never again
        ratios = {m: math.sqrt(moved[m] / size[m]) for m in moved if size[m] > 0}
        off = {m: r for m, r in ratios.items() if r and not 1e-6 <= r <= 0.1}    # (0: weights_frozen's, or a
        #                                                                           step skipped as non-finite)
        if off:
            worst = sorted(off, key=lambda m: abs(math.log10(max(off[m], 1e-12)) + 3), reverse=True)
            self.warn_once("update_ratio", f"step {step}: one update moved {', '.join(worst[:4])} by "
                           + ", ".join(f"{off[m]:.0e}" for m in worst[:4]) + " of their weights' norm (usually 1e-4 "
                           "to 1e-2, about the learning rate over the weights' typical size): too large, and the "
                           "module's weights are thrown around (its learning rate too high, its initialisation far "
                           "too small); too small, and it hardly learns (a learning rate scaled down for its "
                           "parameter group, gradients under Adam's eps, weights initialised far too large).", step)
        moving = sorted(r for r in ratios.values() if r)
        if self.near_peak and moving and moving[len(moving) // 2] < 1e-4:   # (clean medians near the peak:
            #                                                                    8.6e-4 and up; the ratio follows lr)
            self.warn_once("update_ratio", f"step {step}, past the warm-up: one update moved the model's weight "
                           f"matrices by {moving[len(moving) // 2]:.0e} of their norm (the median module; usually "
                           "about 1e-3): the whole model hardly learns. The optimizer's steps are far too small for "
                           "these weights: plain SGD run at a rate tuned for Adam (without Adam's division by the "
                           "gradient's size SGD needs a rate ~100x higher), a learning rate set far too low, the "
                           "loss scaled down where the optimizer does not undo it, or gradients that vanish before "
                           "they reach most of the weights.", step)

    def training_mode(self, step: int) -> None:
        """The loop steps in training mode: whatever sets model.eval() (a validation, a translation)
        sets model.train() back. Only where it matters: a model with some dropout."""
        if not self.model.training and self.dropout:
            self.warn_once("training_mode", f"step {step}: the model trains in eval mode, its dropout off: "
                           "something that called model.eval() (a validation, a translation of examples) did "
                           "not put it back. Keep the mode it found, was_training = model.training, and end "
                           "with model.train(was_training); or call model.train() at the top of every step.", step)

    def optimizer_steps(self, step: int) -> None:
        """Adam counts the steps it takes (state["step"] of each parameter, 0 before the first): since
        the first log line, some (once the loop counted 20) and no more than the loop counted (a step
        skipped moves neither; an fp16 overflow only the loop's). Only where counted: Adam, AdamW."""
        opt = self.optimizer
        if opt is None or not all("betas" in g for g in opt.param_groups):
            return
        counts = [torch.as_tensor(s["step"]).float() for s in opt.state.values() if "step" in s]
        if opt.state and not counts:                            # (another state: not counted)
            return
        taken = int(torch.stack(counts).max().item()) if counts else 0       # (fused: on the GPU, one read)
        self.counted = self.counted or (step, taken)            # the first log line's
        took, counted = taken - self.counted[1], step - self.counted[0]
        if (took == 0 and counted >= 20) or took > counted:     # (fewer is fine: fp16's overflows step no optimizer)
            self.warn_once("optimizer_steps", f"step {step}: the optimizer the run started with took {took} steps "
                           f"(Adam's own count) while the loop counted {counted}: the updates are "
                           "not that optimizer's. Build the optimizer once, before the loop (one built at every step "
                           "starts its moments from zero each time, so every update is about lr * sign(gradient)), "
                           "and call optimizer.step() once per update.", step)

    def rate_applied(self, step: int, lr: float) -> None:
        """The rate the optimizer steps with is the schedule's, the one logged (times a group's lr_scale)."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        rates, wanted = [g["lr"] for g in groups], [lr * g.get("lr_scale", 1.0) for g in groups]
        if any(abs(a - b) > 1e-6 * abs(b) + 1e-12 for a, b in zip(rates, wanted)):
            self.warn_once("lr_not_applied", f"step {step}: the optimizer steps at a learning rate of "
                           f"{', '.join(f'{r:.2e}' for r in rates[:3])}, not the schedule's {lr:.2e} (the one logged): "
                           "the schedule is computed but not applied. Set every parameter group's rate, "
                           "group['lr'] = lr * its lr_scale, before optimizer.step() at every step (an attribute "
                           "such as optimizer.lr is not read).", step)

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
        sums = torch.stack([p.detach().double().sum() for p in self.params]).tolist() if self.params else []
        norm = torch.nn.utils.get_total_norm([p for p in self.params if p.dim() >= 2]).item()
        self.first_norm, self.first_sums = self.first_norm or norm, self.first_sums or sums
        still = [n for n, a, b in zip(self.names, self.first_sums, sums) if a == b]
        if step >= 100 and still:           # (the sum of a tensor that moved is the same only by a fluke)
            self.warn_once("weights_frozen", f"step {step}: {module_names(still)} have not changed since step 1: the "
                           "optimizer does not update them, though they get gradients (checked before step 1): the "
                           "gradients cleared between backward() and optimizer.step() (zero_grad belongs after the "
                           "step), optimizer.step() not called, or a learning rate of 0.", step)
        if norm < 0.5 * self.first_norm:
            self.warn_once("weights_shrink", f"step {step}: the weight matrices have shrunk to "
                           f"{norm / self.first_norm:.2f}x their norm at the start (lr {lr:.2e}); healthy runs grow "
                           "a few %. Something pulls them to 0 faster than the loss can push back: weight decay "
                           "far too strong, or coupled to the gradient (L2 in torch.optim.Adam is scaled up by "
                           "Adam's division by sqrt(v) wherever gradients are small: use AdamW's decoupled "
                           "decay), or a decay applied more than once per step.", step)
        if norm > 1.5 * self.first_norm:
            self.warn_once("weights_grow", f"step {step}: the weight matrices have grown to "
                           f"{norm / self.first_norm:.1f}x their norm at the start (lr {lr:.2e}); healthy runs grow a "
                           "few % in their first hundreds of steps. The updates are far too large: lower "
                           "learning_rate 10x (with Adam, clipping the gradients does not shrink the steps).", step)

    def batch_repeated(self, run, batches: list) -> None:
        """Within an epoch, each step trains on other sentences: the same source batch twice in a row is
        a loop that does not move on (one epoch of one batch excepted: its epoch changes at every step)."""
        src = batches[0][0]
        last_epoch, last_src = self.last_batch
        if last_epoch == run.epoch and last_src.shape == src.shape and torch.equal(last_src, src):
            self.warn_once("batch_repeated", f"step {run.step}: the training batch is the same as the step "
                           "before's, within one epoch: the model trains on a few sentences over and over (its "
                           "training loss falls, its validation loss does not follow). Check that the loop moves "
                           "to the next batch at every step (the index it passes advanced) and that the batches "
                           "are not made anew, in the same order, at every step.", run.step)
        self.last_batch = (run.epoch, src)

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
      loss_stuck            past the warm-up (the learning rate falling) and step 100, at two log lines
                            in a row, the training loss has not fallen 1 nat below ln(V), uniform guessing. A softmax before the
                            cross-entropy cannot: its loss is >= ln(e + V - 1) - 1 > ln(V) - 1.
      teacher_forcing_leak  validation loss below 0.35 nats, yet greedy BLEU below 10: the model is
                            right when it is shown the target, wrong when it must decode on its own.
      source_ignored        at two validations in a row, 30% of the run or more done, another sentence's
                            source costs the model less than 0.05 nats per token (source_gain): it
                            translates without reading (early on, a model learns the target side first).
      translation_length    at two validations in a row, 30% of the run or more done, the greedy
                            translations less than half the references' length (more than twice is
                            common: an undertrained model repeats itself; the clean GRU, 2.2x at 300 steps)
      lr_schedule           the run's progress outside [0, 1]; the learning rate negative, above its peak
                            (peak_lr), still 0 at step 100, or, a tenth of the run past the warm-up (progress),
                            rising or never yet within half of its peak (if a record was logged in that tenth,
                            where every decay is still above half of it); under half its peak and within 1% of one
                            level for a quarter of the run before its last 5% (every decay falls to the end).
      validation_unchanged  two validations in a row give the same loss to the last digit while the
                            training loss fell by over 0.1 nats: the model validated is not the one trained."""

    def __init__(self, peak_lr: float = 0.0, warmup_frac: float = 0.0):
        self.ln_v, self.top_lr, self.named, self.gains, self.ratios = None, 0.0, set(), [], []
        self.peak_lr, self.warmup_frac, self.progress, self.stuck, self.last_lr = peak_lr, warmup_frac, 0.0, 0, 0.0
        self.near_peak = False          # a record logged within a tenth of the run after the warm-up's end
        self.level = (0.0, 0.0)         # (progress, rate) where the rate came to the level it holds (within 1%)
        self.train_loss, self.last_eval = math.nan, None        # (validation_unchanged's: the last validation's
        #                                                          loss, and the training loss then)

    def __call__(self, kind: str, r: dict) -> list[tuple[str, str]]:
        found = []
        if kind == "init":
            self.ln_v = r["ln_v"]
        elif kind == "train" and self.ln_v is not None:
            past_warmup, self.top_lr = r["lr"] < self.top_lr, max(self.top_lr, r["lr"])
            self.near_peak |= self.warmup_frac <= r.get("progress", 0.0) <= self.warmup_frac + 0.1
            wrong = self.schedule_wrong(r["lr"], r.get("progress", 0.0), r["step"])
            if wrong:
                found.append(("lr_schedule", f"step {r['step']}: {r['progress']:.0%} of the run done, the learning "
                              f"rate {wrong}: the schedule is not what the knobs ask for (warm up to the peak "
                              "over warmup_frac of the run, then fall). Check the schedule's formula (the end of "
                              "its warm-up, its decay) and how the run's progress (a fraction in [0, 1]) is "
                              "computed and fed to it."))
            if abs(r["lr"] - self.level[1]) > 0.01 * self.level[1]:
                self.level = (r.get("progress", 0.0), r["lr"])
            self.last_lr = r["lr"]
            stuck = past_warmup and r["step"] >= 100 and r["loss"] > self.ln_v - 1.0
            self.stuck = self.stuck + 1 if stuck else 0         # two log lines in a row: not one noisy batch
            if self.stuck >= 2:
                found.append(("loss_stuck", f"step {r['step']}: past the warm-up, the training loss "
                              f"{r['loss']:.2f} has not fallen 1 nat below ln(V) = {self.ln_v:.2f}, uniform guessing. "
                              "Check that the loss gets raw logits (no softmax before the cross-entropy), that the "
                              "optimizer steps the model's parameters, and its learning rate: far too low for the "
                              "optimizer (plain SGD at a rate tuned for Adam: without Adam's division by the "
                              "gradient's size, SGD needs one ~100x higher) or far too high."))
        elif kind == "eval" and r["val_loss"] < 0.35 and r["bleu"] < 10:
            found.append(("teacher_forcing_leak", f"step {r['step']}: validation loss {r['val_loss']:.2f} (nearly "
                          f"always right when shown the target) but greedy BLEU {r['bleu']:.1f}: the decoder sees "
                          "the word it has to predict. Check the causal mask of decoder self-attention and that "
                          "tgt_in is tgt_out shifted right by one (<bos> first)."))
        if kind == "train":
            self.progress, self.train_loss = r.get("progress", 0.0), r["loss"]
        if kind == "eval":
            last, self.last_eval = self.last_eval, (r["val_loss"], self.train_loss)
            if last and last[0] == r["val_loss"] and last[1] - self.train_loss > 0.1:    # (a model that does not
                #                                                   train at all: weights_frozen's; its loss moves by noise)
                found.append(("validation_unchanged", f"step {r['step']}: the validation loss is "
                              f"{r['val_loss']:.6f} again, to the last digit, while the training loss fell from "
                              f"{last[1]:.3f} to {self.train_loss:.3f}: the model validated is not the one being "
                              "trained. Validate the training model itself (not a copy made at the start, a "
                              "checkpoint read back from disk, or a model built anew), in eval mode."))
        if kind == "eval" and "source_gain" in r:
            self.gains.append(r["source_gain"])
            if len(self.gains) >= 2 and max(self.gains[-2:]) < 0.05 and self.progress >= 0.3:
                found.append(("source_ignored", f"step {r['step']}: given another sentence's source, the model's "
                              f"validation loss rises by only {r['source_gain']:.3f} nats per token: it predicts "
                              "the target from the target alone, a language model. Check that the encoder output "
                              "reaches the decoder (cross-attention's keys and values; the GRU's bridge or context) "
                              "and that each target is paired with its own source."))
        if kind == "eval" and "length_ratio" in r:
            self.ratios.append(r["length_ratio"])
            ratios = self.ratios[-2:]
            if len(ratios) == 2 and self.progress >= 0.3 and max(ratios) < 0.5:
                found.append(("translation_length", f"step {r['step']}: the greedy translations are "
                              f"{r['length_ratio']:.2f}x as long as the references (13a tokens) at two validations "
                              "in a row: decoding stops too early (the length limit, max_len_a and max_len_b; a "
                              "sentence stopped by another's <eos>; <eos> fed as the start token) or the "
                              "translations are cut when turned into text (cut at the first <eos>, only the "
                              "special tokens dropped)."))
        found = [(name, text) for name, text in found if name not in self.named]
        self.named.update(name for name, _ in found)
        return found

    def schedule_wrong(self, lr: float, progress: float, step: int) -> str:
        """What is wrong with the learning rate of a record, if anything ('' for nothing; no peak_lr given:
        nothing is checked)."""
        late = progress > self.warmup_frac + 0.1 and step >= 50     # a tenth of the run past the warm-up (not
        #                                                             the one record of a run of a few steps)
        if not self.peak_lr:
            return ""
        if not -1e-6 <= progress <= 1 + 1e-6:
            return f"is {lr:.1e} at a progress of {progress:.4g}, which is not a fraction of the run"
        if lr < 0:
            return f"is negative ({lr:.1e}): the weights climb the loss"
        if lr > 1.05 * self.peak_lr:
            return f"is {lr:.1e}, above its peak {self.peak_lr:.1e}"
        if lr == 0.0 and step >= 100 and progress < 0.9:        # (a decay to min_lr = 0 ends at 0: at the end)
            return f"is still 0 at step {step}, {progress:.1%} of the run done"
        if late and self.near_peak and self.top_lr < 0.5 * self.peak_lr:    # (any decay is still over half
            #                                                                     its peak there: not unseen)
            return f"has been at most {self.top_lr:.1e}, under half its peak {self.peak_lr:.1e}"
        if late and self.progress >= self.warmup_frac and lr > 1.01 * self.last_lr:     # (the previous record's)
            return f"rose from {self.last_lr:.1e} to {lr:.1e} after the warm-up"
        since, level = self.level                                   # (every decay falls to the run's end)
        if lr < 0.5 * self.peak_lr and abs(lr - level) <= 0.01 * level and progress - since >= 0.25 and \
                since >= self.warmup_frac and progress < 0.95:
            return (f"has stayed at {lr:.1e}, under half its peak, from {since:.0%} of the run on: the decay ends "
                    "long before the run does (its clock, (p - w) / (1 - w), reaches 1 early)")
        return ""
