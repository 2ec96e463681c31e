"""
Diagnostics: warnings in train.py's log that name a classic seq2seq bug, each with its likely
cause and its fix: a line "warning: ..." and a record {"kind": "warning", "name": ...} of log.jsonl.
train_loop wires them in, by when they look:

    check_initial_loss, probe_model   before step 1: the untrained model, the loss and the data, tested
                  for the properties a correct encoder-decoder has (what it reads, decoding = training, ...)
    StepChecks    in common.StepLog, at every log line: the weights and gradients; at every step: the batch
                  moving on (in overfit mode: staying the same)
    Symptoms      in common.RunLog, at every record: the loss against ln(V), the learning rate's schedule,
                  validation loss against BLEU, what its source is worth to the model, the translations' length
docs/debugging.md: the bugs they name (tools/bugs.py, five held-out sets among them), what they do not
name, and their cost. Leaves out: statistics of activations, a learning-rate finder, beam search.
"""

import collections
import contextlib
import itertools
import math

import torch

import decoding  # (its functions looked up at each call: a bug put into decoding.py is seen)


@torch.no_grad()
def check_initial_loss(model, batch: tuple, loss_fn, data, log, amp) -> None:
    """An untrained model should be as unsure as uniform guessing: loss close to ln(V) (with logits of
    unit variance, ~0.5 nats above it whatever V is). Far above: over-confident first guesses (weights
    too large, a wrong output layer); below: the model sees the word it must predict (a leaking mask)
    or the loss is divided by the wrong count. docs/robustness.md says why the tolerance is 1 nat below
    and 2 above. On the batch's first 32 sentences: an untrained model's loss hardly varies between them.
    Logs an "init" record (step 0's loss and ln(V)), which Symptoms reads."""
    pad_id, device = data.tgt_tok.pad_id, next(model.parameters()).device
    model.eval()
    src, tgt_in, tgt_out = (t[:32].to(device) for t in batch)  # (32 sentences: ~0.02 nats of noise at init)
    with amp:
        loss = (loss_fn(model(src, tgt_in), tgt_out, pad_id, 0.0) / (tgt_out != pad_id).sum()).item()
    model.train()
    ln_v = math.log(data.tgt_tok.vocab_size)
    log.record("init", f"step 0: loss {loss:.3f}, ln(V) = {ln_v:.3f} ({loss - ln_v:+.2f} nats)",
               step=0, loss=loss, ln_v=ln_v)
    if not -1.0 <= loss - ln_v <= 2.0:     # (five seeds of config/toy_reverse.py: +0.2 to +1.8)
        log.warn("initial_loss", f"the initial loss is {loss - ln_v:+.1f} nats from ln(V): check the weight "
                 "initialisation, the output layer and the loss masking")


@torch.no_grad()
def probe_model(model, batch: tuple, loss_fn, data, log, optimizer=None, smoothing: float = 0.0,
                rows: int = 4) -> list[str]:
    """Before step 1, test the untrained model on a few sentences of the first batch (src, tgt_in,
    tgt_out; the sources cut to mixed lengths) for the properties a correct encoder-decoder has,
    whatever the bug that breaks them; warn (log.warn) about each that fails (where two runs that
    must agree part: where_they_part), print the list of those that hold, and return it:
      teacher_forcing_pairs the first batch: tgt_in = <bos> + tgt_out shifted right, one <eos> ending
                            each side, then padding only
      reads_what_it_should  one prediction's gradient reaches every real source token, every real
                            encoder output it attends to, and the target inputs up to its own
                            position, and nothing else (dependency_probe)
      alone_as_in_a_batch   a sentence's logits alone are its logits in the batch, padding and all
      word_order            the prediction responds to the word it is given, and the encoder and the
                            decoder tell a sentence from its words reordered
      no_hidden_state       the same batch twice, another between: the same logits
      decoding_as_trained   decoding step by step gives the teacher-forced logits; greedy decoding's
                            choices are the forward pass's first ones on its own output, and
                            translate() encodes its sources as training does and gives what
                            greedy decoding does, alone or not, and the same twice (dropout off
                            while decoding: dropout_in_decoding)
      loss_as_defined       loss_fn is the cross-entropy of each position's logits against its own
                            target (label smoothing too), its gradient p - q; padding costs nothing
      attention_as_designed attention weights are distributions over the keys, their scores spread as
                            1 / sqrt(Dh) makes them; word embeddings about as large as the positions,
                            neighbouring positions' codes alike
      every_parameter_learns  every parameter gets a gradient and is in the optimizer, whose settings
                            hold (Adam's beta1 < beta2, weight decay decoupled)
      data_pairs            data_checks: the pairs aligned, validation apart from train, sides not
                            swapped, each side's ids its text's encoding, decoding back to it
    A probe that raises is a warning (probe_failed): a diagnostic never stops a run. About two
    training steps of work, once, in full precision."""
    was_training, device = model.training, next(model.parameters()).device
    src, tgt_in, tgt_out = (t[:rows].to(device) for t in batch)
    src = torch.cat([src, torch.full_like(src[:, :3], data.src_tok.pad_id)], dim=1)   # padding for sure
    src = mixed_lengths(src, data.src_tok)
    model.eval()
    logits = model(src, tgt_in)                                 # (rows, T, V): what each probe compares with
    probes = {"teacher_forcing_pairs": lambda: teacher_forcing_pairs(batch, data),
              "reads_what_it_should": lambda: dependency_probe(model, src, tgt_in, tgt_out, data),
              "alone_as_in_a_batch": lambda: alone_as_in_a_batch(model, src, tgt_in, logits, data),
              "word_order": lambda: word_order(model, src, tgt_in, logits, data),
              "no_hidden_state": lambda: no_hidden_state(model, src, tgt_in, logits),
              "decoding_as_trained": lambda: decoding_as_trained(model, src, tgt_in, logits, data, device),
              "loss_as_defined": lambda: loss_as_defined(tgt_out, loss_fn, data, smoothing),
              "attention_as_designed": lambda: attention_as_designed(model, src, tgt_in),
              "every_parameter_learns": lambda: every_parameter_learns(model, src, tgt_in, tgt_out, loss_fn, data,
                                                                       optimizer),
              "data_pairs": lambda: data_checks(data)}
    results = {}
    for name, probe in probes.items():
        try:
            results[name] = probe()
        except Exception as e:          # a diagnostic never stops a run: the model failed the probe instead
            results[name] = [("probe_failed", f"the probe {name} (diagnostics.py) failed on the untrained model "
                              f"with {type(e).__name__}: {str(e)[:200]}. The model does not behave as an "
                              "encoder-decoder is expected to (a tensor detached or computed under no_grad where "
                              "the loss needs its gradient, a shape the model does not expect); training goes on.")]
        model.eval()
    model.train(was_training)
    for found in results.values():
        for name, text in found:
            log.warn(name, text)
    passed = [name for name, found in results.items() if not found]
    log.say(f"checked before step 1 ({len(passed)} of {len(results)} hold; diagnostics.py): {', '.join(passed)}\n"
            "  watched from here: batches moving on, gradients cleared, weights moving and not blowing up, loss spikes, "
            "the loss against ln(V), the learning rate's schedule, what the source is worth and the translations' "
            "length at validation\n  can it overfit one batch? --overfit_batches=1")
    return passed


def mixed_lengths(src: torch.Tensor, tok) -> torch.Tensor:
    """The probe's sources at different lengths, in no order, as translation batches have them (a
    training batch's sentences are of about one length): of 4 rows, the first keeps 3/4 of its real
    tokens, the next 2/4, 1/4 and all, then <eos>, then padding; so sorting by length and undoing it,
    packing and padding masks are all exercised."""
    src, rows = src.clone(), len(src)
    for i in range(rows):
        n = int((src[i] != tok.pad_id).sum()) - 1                # real tokens before <eos>
        keep = max(1, n * ((3 * i + 2) % rows + 1) // rows)
        src[i, keep + 1:] = tok.pad_id
        src[i, keep] = tok.eos_id
    return src


def teacher_forcing_pairs(batch: tuple, data) -> list[tuple[str, str]]:
    """A training batch as teacher forcing needs it: tgt_in is <bos> then tgt_out shifted right by one;
    the source and tgt_out each hold one <eos>, at the end of their real tokens, and after it only padding."""
    src, tgt_in, tgt_out = batch
    pad, bos = data.tgt_tok.pad_id, data.tgt_tok.bos_id
    real = tgt_out != pad
    shifted = torch.cat([torch.full_like(tgt_out[:, :1], bos), tgt_out[:, :-1]], dim=1).masked_fill(~real, pad)
    if not torch.equal(tgt_in.masked_fill(~real, pad), shifted) or not ends_in_eos(tgt_out, data.tgt_tok) or \
            not ends_in_eos(src, data.src_tok):
        return [("target_shift", "the training batch does not pair tgt_in with tgt_out for teacher forcing: at "
                 "each position the decoder must read the previous target word (tgt_in = <bos> + tgt_out shifted "
                 "right by one) and predict the current one; the source and tgt_out end in one <eos>, and after "
                 "it comes padding (pad_id) only. Check collate's shift, the special tokens and the padding id.")]
    return []


def ends_in_eos(ids: torch.Tensor, tok) -> bool:
    """Each row (B, L) as training has it: real tokens first, the one <eos> last of them, then pad only."""
    kept = ids != tok.pad_id
    last = ids.gather(1, (kept.sum(1, keepdim=True) - 1).clamp_min(0))[:, 0]
    return bool((kept.cumprod(1).sum(1) == kept.sum(1)).all() and (last == tok.eos_id).all()
                and ((ids == tok.eos_id).sum(1) == 1).all())


def dependency_probe(model, src, tgt_in, tgt_out, data) -> list[tuple[str, str]]:
    """Karpathy's dependency probe: backpropagate one prediction (row b, target position t) to the
    embeddings of all the inputs. A correct model's gradient reaches every real source token of
    row b and its target inputs 0..t; not row b's padding, not its later target inputs, no other
    row; and, where the model attends, the encoder's output at every real source position (the
    encoder mixes the source, so the embeddings alone cannot show what the attention hides).
    Needs the model's src_embed and tgt_embed (both models have them); the encoder embeds first."""
    lengths = (tgt_out != data.tgt_tok.pad_id).sum(dim=1)
    b = int(lengths.argmax())
    t = int(lengths[b]) // 2                                    # a position with a past and a future
    outputs = []

    def keep(module, args, out):
        if out.requires_grad:                                   # (not: every_parameter_learns names it)
            out.retain_grad()
        outputs.append(out)
    hooks = [m.register_forward_hook(keep) for m in {id(m): m for m in (model.src_embed, model.tgt_embed)}.values()]
    try:
        with torch.enable_grad(), encoder_calls(model) as calls:
            logits = model(src, tgt_in)                         # (B, T, V)
            encoded = [first_tensor(memory) for _, memory in calls]     # the encoder output, kept too: what
            for e in encoded:                                           # the decoder's attention reads of it
                if e.requires_grad:
                    e.retain_grad()
            logits[b, t].log_softmax(-1)[int(logits[b, t].argmin())].backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    if len(outputs) < 2 or outputs[0].grad is None or outputs[-1].grad is None:
        return []
    src_read = outputs[0].grad.abs().sum(dim=-1) > 0            # (B, S) which source embeddings it read
    tgt_read = outputs[-1].grad.abs().sum(dim=-1) > 0           # (B, T)
    enc_grad = encoded[0].grad if encoded and encoded[0].grad is not None else None
    attended = enc_grad[b].abs().sum(dim=-1) > 0 if enc_grad is not None else None   # (S,) or None: no attention
    real, others = src[b] != data.src_tok.pad_id, torch.arange(len(src), device=src.device) != b
    # a gradient where none belongs is a leak for sure; none where one belongs only if nothing saturates
    # (an over-confident untrained model's softmaxes round their small gradients to 0: initial_loss's case)
    trusted = bool(logits[b, t].detach().float().softmax(-1).max() < 0.9)
    found, pad_id = [], data.src_tok.pad_id

    def where(leak: str) -> str:                                # where the leak enters, as a clause
        part = leak_parts(model, src, tgt_in, b, t, leak, pad_id)
        return f"; it enters {part}" if part else ""
    if tgt_read[b, t + 1:].any():
        found.append(("causal_mask", f"the prediction at target position {t} reads the target inputs after it "
                      f"(positions {tgt_read[b, t + 1:].nonzero()[:, 0].add(t + 1).tolist()}){where('future')}: "
                      "the decoder sees the future, and learns to copy instead of to translate. Mask decoder "
                      "self-attention causally (query t sees keys 0..t), and look for what mixes positions: the "
                      "heads merged back without transposing (B, H, T, Dh) -> (B, T, H, Dh) first, a normalisation "
                      "or softmax over the time axis instead of the features (or the keys)."))
    if trusted and not tgt_read[b, :t + 1].all():
        found.append(("target_unread", f"the prediction at target position {t} does not read target inputs "
                      f"{(~tgt_read[b, :t + 1]).nonzero()[:, 0].tolist()} (its own and earlier ones: the words "
                      "decoded so far): a causal mask that also hides the diagonal, or a shift of tgt_in."))
    if trusted and not src_read[b][real].all():
        found.append(("source_unread", f"the prediction at target position {t} does not read source tokens "
                      f"{(~src_read[b] & real).nonzero()[:, 0].tolist()} of its sentence (of {int(real.sum())}): the "
                      "decoder gets no information from them. Check the source mask's polarity (True = a real "
                      "token), cross-attention's keys and values (the encoder output), the GRU's lengths."))
    if trusted and attended is not None and attended.any() and not attended[real].all():
        found.append(("source_positions_hidden", f"the prediction at target position {t} attends to no encoder "
                      f"output at source positions {(~attended & real).nonzero()[:, 0].tolist()} of its sentence (of "
                      f"{int(real.sum())}), though they are real tokens: its attention over the source hides them. "
                      "Check the mask handed to cross-attention (the source's padding mask, True = a real token, "
                      "(B, 1, 1, S); not the decoder's causal mask, which would hide source positions after t), "
                      "its polarity (masked_fill where the mask is False), and the GRU attention's mask."))
    if src_read[b][~real].any():
        found.append(("padding_mask", f"a prediction reads the padding after its source sentence"
                      f"{where('padding')}: attention (or the recurrence) reads padding, and a sentence is "
                      "translated differently in a batch than alone. Mask padded keys (src != pad) in encoder "
                      "self-attention and cross-attention; pack the GRU's input by its lengths; no normalisation "
                      "or softmax over the time axis."))
    if src_read[others].any() or tgt_read[others].any():
        found.append(("batch_leak", "a prediction for one sentence reads the other sentences of its batch"
                      f"{where('batch')}: a view or reshape that mixes the batch dimension with another (check "
                      "the head split and merge: (B, L, H, Dh) -> (B, H, L, Dh)), or a statistic taken over the "
                      "batch."))
    return found


def leak_parts(model, src, tgt_in, b: int, t: int, leak: str, pad_id: int) -> str:
    """Where a leak the dependency probe found enters (where_they_part): row b's forward pass against
    one where what it must not read is changed: 'future' its target inputs after t, 'padding' the
    embeddings of its source padding, 'batch' the other rows' tokens. They must agree on row b
    (up to t for the future; at the real source positions)."""
    B, S, T = *src.shape, tgt_in.shape[1]
    real = src[b] != pad_id
    src2, tgt2, hooks = src.clone(), tgt_in.clone(), []
    if leak == "future":
        tgt2[b, t + 1:] = tgt_in[b, t + 1:].roll(1)
    elif leak == "batch":
        others = torch.arange(B, device=src.device) != b
        src2[others], tgt2[others] = src[others].roll(1, 1), tgt_in[others].roll(1, 1)
    else:
        def noise(module, args, out):                           # the first call: the source's embeddings
            hooks.pop().remove()
            changed = (src == pad_id) & (torch.arange(B, device=src.device) == b)[:, None]       # (B, S)
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
            return out + noise * changed[:, :, None]
        hooks.append(model.src_embed.register_forward_hook(noise))

    def pick(x, y):
        if x.shape != y.shape or x.dim() < 2 or x.shape[0] != B:
            return None
        if leak == "future":
            return (x[b, :t + 1], y[b, :t + 1]) if x.shape[1] == T else None
        if leak == "padding":       # (B, S, ...) at the real positions (if S = T, the decoder's some of its)
            return (x[b, real], y[b, real]) if x.shape[1] == S else (x[b], y[b]) if x.shape[1] == T else None
        return x[b], y[b]
    try:
        return where_they_part(model, lambda: model(src, tgt_in), lambda: model(src2, tgt2), pick)
    finally:
        for h in hooks:
            h.remove()


def alone_as_in_a_batch(model, src, tgt_in, logits, data) -> list[tuple[str, str]]:
    """Two sentences alone, without the padding the batch gave them, have the logits they have in it
    (the shortest, with the most padding, and the longest)."""
    lengths = (src != data.src_tok.pad_id).sum(dim=1)
    for b in dict.fromkeys((int(lengths.argmin()), int(lengths.argmax()))):
        s, t = int((src[b] != data.src_tok.pad_id).sum()), int((tgt_in[b] != data.tgt_tok.pad_id).sum())
        if differ(model(src[b:b + 1, :s], tgt_in[b:b + 1, :t]), logits[b:b + 1, :t]):
            def pick(x, y):                                     # the batch's row b against the sentence alone
                fits = x.dim() == y.dim() >= 2 and x.shape[0] == len(src) and y.shape[0] == 1
                return (x[b, :y.shape[1]], y[0]) if fits and x.shape[2:] == y.shape[2:] and \
                    x.shape[1] >= y.shape[1] else None
            where = where_they_part(model, lambda: model(src, tgt_in),
                                    lambda: model(src[b:b + 1, :s], tgt_in[b:b + 1, :t]), pick)
            return [("batch_dependence", f"sentence {b} of the first batch gets other logits alone than in its batch"
                     f"{'; they part ' + where if where else ''}: "
                     "a translation depends on what it is batched with. Mask padding (source and target), take "
                     "positions and lengths per sentence, not from the padded batch, and keep every operation "
                     "within one sentence (no reshape across the batch, no statistic over the time axis; a batch "
                     "sorted by length, to pack it, put back in its order).")]
    return []


def word_order(model, src, tgt_in, logits, data) -> list[tuple[str, str]]:
    """Reordering a sentence's words must change the encoder's output for them (beyond reordering it),
    and reordering the target inputs before position t must change the prediction at t, which must
    respond to the word given at t at all (input_response: else that, not the order, is named)."""
    found, b = [], int((src != data.src_tok.pad_id).sum(dim=1).argmax())
    n = int((src[b] != data.src_tok.pad_id).sum()) - 1              # the real tokens before <eos>
    if n >= 3:
        order = torch.arange(src.shape[1], device=src.device)
        order[:n] = order[:n].flip(0)
        out, out_reordered = (first_tensor(model.encode(s[None])) for s in (src[b], src[b, order]))
        if not differ(out_reordered[:, :n], out[:, order[:n]]):
            found.append(("no_positions", "the encoder's output for a sentence with its words in reverse order is "
                          "the same output in reverse order: it cannot tell word order. Add positional encodings "
                          "to the embeddings (and check they are not zero, or added after the attention)."))
    faint = input_response(model, src, tgt_in, logits, data)
    if faint is not None and faint < 0.05:      # (at init: 0.3-0.8 for both models; with the input cut, ~0.01 or 0)
        return [("target_input_ignored", f"replacing the target word given at a position changes the prediction "
                 f"there by only {faint:.3f} of the logits' spread (0.3-0.8 in a healthy untrained model): the "
                 "decoder hardly reads its own input, so it cannot follow what it has translated so far. Check the "
                 "path from the target embedding to the output: the embedding's scale (times sqrt(d), not divided "
                 "by it), the residual connections (x + sublayer(x), not the sublayer's output alone), nothing "
                 "detached, zeroed or overwritten on the way (the GRU's input at every step).")]
    T = tgt_in.shape[1]
    if T >= 4:
        swapped = tgt_in.clone()
        swapped[:, [1, 2]] = tgt_in[:, [2, 1]]
        if (tgt_in[:, 1] != tgt_in[:, 2]).any() and not differ(model(src, swapped)[:, 3:], logits[:, 3:]):
            found.append(("no_positions", "swapping two target words leaves the predictions after them unchanged: "
                          "the decoder cannot tell the order of the words decoded so far. Add positional encodings "
                          "to the target embeddings too."))
    return found[:1]


def input_response(model, src, tgt_in, logits, data) -> float | None:
    """How much the logits at a target position change when the word given there is replaced by another
    row's: their mean absolute change over the logits' spread (standard deviation over the vocabulary),
    at the first position where some rows' words differ; None if none does."""
    other = tgt_in.roll(1, 0)
    for t in range(1, tgt_in.shape[1]):
        rows = (other[:, t] != tgt_in[:, t]) & (tgt_in[:, t] != data.tgt_tok.pad_id) & (other[:, t] != data.tgt_tok.pad_id)
        if rows.any():
            changed = tgt_in.clone()
            changed[:, t] = other[:, t]
            before, after = logits[rows, t].float(), model(src, changed)[rows, t].float()
            return ((after - before).abs().mean() / before.std(dim=-1).mean().clamp_min(1e-9)).item()
    return None


@contextlib.contextmanager
def encoder_calls(model):
    """model.encode watched while inside: yields the list of its calls, each (src, memory)."""
    calls, encode = [], model.encode

    def watched(src):
        calls.append((src, encode(src)))
        return calls[-1][1]
    model.encode = watched                      # an attribute of this model over its method, deleted after
    try:
        yield calls
    finally:
        del model.encode


def first_tensor(memory) -> torch.Tensor:
    """The encoder output in a model's memory: (B, S, D) for both models (a tuple whose first item it is)."""
    return memory[0] if isinstance(memory, (tuple, list)) else memory


def no_hidden_state(model, src, tgt_in, logits) -> list[tuple[str, str]]:
    """A model is a function of its input: the same batch gives the same logits after another batch."""
    model(src.roll(1, 0), tgt_in.roll(1, 0))                    # another batch of the same shape
    if differ(model(src, tgt_in), logits):
        return [("hidden_state", "the same batch gave other logits after the model had read another one: state "
                 "carries over between calls (a hidden state kept on the model, a cache not reset, running "
                 "statistics). Start every sentence from a fresh state.")]
    return []


STEPS = 6   # tokens decoded per sentence by the decoding probes (each costs a call of the model)


def decoding_as_trained(model, src, tgt_in, logits, data, device) -> list[tuple[str, str]]:
    """Decoding one token at a time (decode_step and its cache) must compute what the teacher-forced
    forward pass does: fed the batch's target inputs one by one, the same logits at every real position.
    Greedy decoding must then be what the forward pass, given greedy's own output, does: at every step
    its token the most likely one, its score their log-probabilities' sum (the start token), each
    sentence of a batch stopping on its own; translate() must encode its sources as training does and
    give greedy decoding's output, in input order, the same twice from a model left in training mode
    (dropout off while decoding). STEPS tokens each: decode_step on the batch's first two rows, greedy
    and translate() on two short validation sentences, the longer first (translate() sorts them)."""
    src_tok, tgt_tok = data.src_tok, data.tgt_tok
    src, tgt_in, logits = src[:2], tgt_in[:2], logits[:2]       # (two rows, both cut short: padded)
    memory, cache = model.encode(src), None
    real = tgt_in != tgt_tok.pad_id
    for t in range(min(tgt_in.shape[1], STEPS)):
        step_logits, cache = model.decode_step(tgt_in[:, t], memory, cache)    # (B, V)
        if differ(step_logits[real[:, t]], logits[:, t][real[:, t]]):
            where = step_parts(model, src, tgt_in, real[:, t], t)
            return [("decoding_mismatch", f"decoding one token at a time (decode_step and its cache), fed the "
                     f"target inputs of the first batch, gives other logits than the teacher-forced forward pass "
                     f"from position {t} on{'; they part ' + where if where else ''}: decoding does not compute "
                     "what training trained. Check that each "
                     "step embeds its token as training does (the same scale and dropout off), its position (the "
                     "number of tokens decoded before it), the cache (keys and values appended, not replaced; "
                     "the GRU's hidden state fed back), and the masks decode_step hands the attention.")]
    texts = short_sources(data, 2)[::-1]        # the longer first: translate() sorts, and must put it back
    ids = [src_tok.encode(text) + [src_tok.eos_id] for text in texts]    # padded here, not by decoding's
    two = torch.full((2, max(map(len, ids))), src_tok.pad_id, dtype=torch.long, device=device)
    for i, x in enumerate(ids):                                 # helpers: the reference translate() is
        two[i, :len(x)] = torch.tensor(x, device=device)        # compared with must not share its bugs
    hyp, score = decoding.greedy(model, two, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id, STEPS)
    fed = torch.cat([torch.full_like(hyp[:, :1], tgt_tok.bos_id), hyp[:, :-1]], dim=1)
    logp = model(two, fed).float().log_softmax(-1)                                 # (2, T, V) teacher-forced
    direct = []
    for r in range(2):
        chosen = logp[r].gather(1, hyp[r, :, None])[:, 0]                          # (T,)
        ended = (hyp[r] == tgt_tok.eos_id).nonzero()
        n = int(ended[0, 0]) + 1 if len(ended) else hyp.shape[1]
        if not len(ended) and n < STEPS:
            return [("decoding_mismatch", f"batched greedy decoding stopped \"{texts[r][:40]}\" after {n} tokens, "
                     f"without its <eos> and before its limit of {STEPS}: a sentence must decode as it would alone, "
                     "stopping at its own <eos> or its own length limit, not when another sentence of the batch "
                     "does (stop when all are done, not any).")]
        off = (logp[r].max(-1).values - chosen)[:n] > 1e-3 * (1 + chosen[:n].abs())   # greedy took another token
        if not off.any() and abs(float(chosen[:n].sum()) - float(score[r])) > 1e-3 * (1 + abs(float(score[r]))):
            off[n - 1] = True                                   # its own score is off: how it adds them up
        if off.any():
            return [("decoding_mismatch", f"greedy decoding does not choose what the teacher-forced forward pass "
                     f"of its own output ranks first, from step {int(off.nonzero()[0, 0])} of \"{texts[r][:40]}\" on: "
                     "greedy decoding does not take the most likely word. Check that it takes the log-softmax and "
                     "the argmax over the vocabulary (the last axis, not the batch), feeds back what it chose as "
                     "the next step's input, starts from <bos>, and adds up the chosen log-probabilities.")]
        direct.append(tgt_tok.decode(hyp[r, :n - 1 if len(ended) else n].tolist()))     # up to its <eos>
    model.train()                                               # as validation finds it during training
    with encoder_calls(model) as calls:                         # what translate() hands the encoder
        translations = [decoding.translate(model, src_tok, tgt_tok, texts, device=device, max_len_a=0.0,
                                           max_len_b=STEPS)]
    if not all(ends_in_eos(s, src_tok) for s, _ in calls):
        model.eval()
        return [("decoding_input", "translate() hands the encoder sources that are not as in training (each "
                 "sentence's tokens, one <eos> last, then padding only): the model translates input it never saw. "
                 "Encode each source as training's data does (the same tokenizer, <eos> appended, padded with "
                 "pad_id after it).")]
    if translations[0] != direct:                               # dropout on, or translate() wrong: which?
        translations.append(decoding.translate(model, src_tok, tgt_tok, texts, device=device, max_len_a=0.0,
                                               max_len_b=STEPS))
    model.eval()
    if translations[-1] != translations[0]:
        return [("dropout_in_decoding", "greedy decoding of the same 2 short validation sentences twice gave "
                 "different translations: dropout is on while decoding. Call model.eval() before decoding or "
                 "validating, and model.train() after.")]
    if translations[0] != direct:
        return [("translate_mismatch", "translate() does not return what greedy decoding of its sentences gives: "
                 "check the start and end tokens it passes to greedy decoding (<bos> to start, <eos> to stop), "
                 "that the translations are put back in input order, and that each is cut at its own <eos>.")]
    return []


def step_parts(model, src, tgt_in, rows, t: int) -> str:
    """Where decode_step at position t (after steps 0..t-1) and the forward pass part, on the given rows
    (where_they_part): the forward's (B, T, ...) tensors at t against the step's (B, 1, ...) or (B, ...)."""
    memory, cache = model.encode(src), None
    for u in range(t):
        _, cache = model.decode_step(tgt_in[:, u], memory, cache)
    B, T = tgt_in.shape

    def pick(x, y):
        if x.dim() < 2 or x.shape[0] != B or y.shape[0] != B or x.shape[1] != T:
            return None
        if y.dim() == x.dim() and y.shape[1] == 1 and y.shape[2:] == x.shape[2:]:
            return x[rows, t], y[rows, 0]
        return (x[rows, t], y[rows]) if y.shape[1:] == x.shape[2:] else None
    return where_they_part(model, lambda: model(src, tgt_in), lambda: model.decode_step(tgt_in[:, t], memory, cache),
                           pick)


def short_sources(data, n: int) -> list[str]:
    """The n shortest of the first 20 validation sources, shortest first: the decoding probes' inputs
    (short: each decoded token costs a call of the model)."""
    return sorted((t for t in data.splits["validation"].src_text[:20] if t.strip()), key=len)[:n]


def loss_as_defined(tgt_out, loss_fn, data, smoothing: float) -> list[tuple[str, str]]:
    """loss_fn(logits, tgt_out, pad, eps) is its definition: with p = softmax(logits) and q the target
    distribution ((1 - eps) on tgt_out's token at each position, eps / V spread), the sum of -q log p over
    the positions whose target is not pad, and its gradient (p - q) there, 0 at padding. Random
    logits (not the untrained model's, nearly uniform) so that a token scored against another's
    target costs a different loss; with smoothing 0 and the run's."""
    pad, V = data.tgt_tok.pad_id, data.tgt_tok.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(*tgt_out.shape, V, generator=g)).to(tgt_out.device).requires_grad_()
    if loss_fn(logits, torch.full_like(tgt_out, pad), pad, 0.0).item() != 0.0:
        return [("padding_in_loss", "the training loss of targets that are all padding is not 0: padded positions "
                 "count in the loss and its average. Leave out the positions where tgt_out is pad.")]
    real = (tgt_out != pad)[..., None].float()                                   # (B, T, 1)
    for eps in dict.fromkeys((0.0, smoothing)):
        q = torch.full_like(logits, eps / V).scatter_add(
            -1, tgt_out.clamp(0, V - 1)[..., None], torch.full_like(logits[..., :1], 1 - eps))
        with torch.enable_grad():
            loss = loss_fn(logits, tgt_out, pad, eps)
            grad, = torch.autograd.grad(loss, logits)
        p = logits.detach().softmax(-1)
        expected = -(q * p.log() * real).sum()
        if differ(loss.detach().reshape(()), expected) or differ(grad, (p - q) * real):
            return [("loss_definition", f"the training loss (label smoothing {eps}) of random logits is "
                     f"{loss.item():.2f} (gradient off by up to {(grad - (p - q) * real).abs().max():.2f}), where the "
                     f"cross-entropy of the logits against tgt_out at the same positions is {expected.item():.2f}: "
                     "the loss does not score each position's logits against its own target. Check that logits "
                     "(B, T, V) and tgt_out (B, T) are flattened the same way (both batch-major: "
                     "logits.flatten(0, 1), tgt_out.flatten(); not one transposed), that the loss gets raw logits "
                     "(no softmax or log_softmax of its own before it), tgt_out and not tgt_in, and the smoothing "
                     "term (eps / V over all V words) and the gradient (p - q) of a hand-written loss.")]
    return []


def attention_as_designed(model, src, tgt_in) -> list[tuple[str, str]]:
    """The attention weights of each query are a distribution over the keys (>= 0, summing to 1), its
    scores spread as 1 / sqrt(Dh) makes them; the word embeddings are about as large as the positions
    added to them (Transformer: ~1.4x, whatever d_model, with the sqrt(d_model) scale)."""
    weights = model.attention_weights(src, tgt_in) if hasattr(model, "attention_weights") else {}   # Transformer
    maps = {f"{kind} layer {i + 1}": w for kind, layers in weights.items() for i, w in enumerate(layers)
            if w is not None} if weights else model.attention_maps(src, tgt_in)     # (B, [H,] T, S) each
    memory = model.encode(src) if hasattr(model, "attend") else None
    if getattr(memory, "keys", None) is not None:           # the GRU with attention: whatever the query, an
        ones = memory._replace(outputs=torch.ones_like(memory.outputs))        # average of values that are
        query = torch.randn(src.shape[0], 2, memory.keys.shape[-1], generator=torch.Generator().manual_seed(0))
        maps["the GRU's, of all-ones values"] = model.attend(query.to(src.device), ones)[..., :1]   # all ones
    for name, w in maps.items():
        if w.min() < -1e-6 or (w.sum(dim=-1) - 1).abs().max() > 1e-3:
            return [("attention_not_distribution", f"the attention weights ({name}) of a query do not form a "
                     f"distribution over the keys (they range {w.min():.2f} to {w.max():.2f}, sum to up to "
                     f"{w.sum(dim=-1).abs().max():.2f}): the context is not an average of the values. Put the "
                     "scores through a softmax over the keys (the last axis), after masking, before weighting "
                     "the values.")]
    if hasattr(model, "positions"):
        positions = model.positions[:tgt_in.shape[1]]                          # (T, D)
        words = model.embed(model.tgt_embed, tgt_in) - positions                # (B, T, D), dropout off
        ratio = (words.norm(dim=-1)[tgt_in != model.cfg.pad_id].mean() / positions.norm(dim=-1).mean()).item()
        if not 0.5 < ratio < 4.0:
            return [("embedding_scale", f"the word embeddings are {ratio:.2f}x as large as the positional "
                     "encodings added to them (~1.4x with the usual scale): "
                     + ("the word is drowned by its position. " if ratio <= 0.5 else "the position is drowned. ")
                     + "Multiply the embeddings by sqrt(d_model) (once) before adding the positions, with "
                     "embeddings initialised N(0, 1/d_model).")]
        near = torch.nn.functional.cosine_similarity(model.positions[:63], model.positions[1:64]).mean().item()
        if near < 0.5:                  # (sinusoids: 0.94 at d_model 16, 0.97 at 512; noise-like rows: ~0)
            return [("position_encoding", f"neighbouring positions' encodings have a cosine similarity of {near:.2f} "
                     "(0.94-0.97 for sinusoids of any width): the encodings look like noise, not a smooth code of "
                     "the position, so the model cannot tell near from far. Check the sinusoids' frequencies, "
                     "1 / 10000^(2i/d_model), falling as i grows (the exponent's sign), and that row p holds "
                     "sin(p * freq) and cos(p * freq).")]
    spread = attention_spread(weights) if weights else 0.0
    if spread > 1.5:
        return [("attention_scale", f"the untrained model's attention scores spread with a standard deviation of "
                 f"{spread:.1f} (~0.6 when scaled): softmax picks nearly one key and passes little gradient. "
                 "Divide Q K^T by sqrt(Dh) before the softmax; check the weight initialisation.")]
    return []


def every_parameter_learns(model, src, tgt_in, tgt_out, loss_fn, data, optimizer) -> list[tuple[str, str]]:
    """One backward pass of the loss on the probe's sentences: every trainable parameter gets a gradient
    that is not all zero, and the optimizer holds it; no parameter is frozen in a model without pruned heads."""
    found = []
    with torch.enable_grad():
        loss_fn(model(src, tgt_in), tgt_out, data.tgt_tok.pad_id, 0.0).backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.requires_grad and p.numel() and (p.grad is None or not p.grad.any())]
    model.zero_grad(set_to_none=True)
    if no_grad:
        found.append(("no_gradient", f"{module_names(no_grad)} get no gradient from the loss: they are not on the "
                      "path from the input to the logits (a tensor detached, a module built but never called, "
                      ".data or torch.no_grad() around a computation), so they never learn."))
    held = {id(p) for group in (optimizer.param_groups if optimizer is not None else []) for p in group["params"]}
    missed = [n for n, p in params.items() if p.requires_grad and optimizer is not None and id(p) not in held]
    if missed:
        found.append(("not_optimized", f"{module_names(missed)} are trainable but not in the optimizer, which never "
                      "updates them: build the optimizer from model.parameters() after the model is complete."))
    for group in optimizer.param_groups if optimizer is not None else []:
        beta1, beta2 = group.get("betas", (0.0, 1.0))
        coupled = group.get("weight_decay", 0.0) > 0 and group.get("decoupled_weight_decay") is False
        if not 0 <= beta1 < beta2 < 1 or coupled:
            name = type(optimizer).__name__
            found.append(("optimizer_settings", f"the optimizer ({name}) adds weight decay {group['weight_decay']} to "
                          "the gradient (L2), and Adam divides it by sqrt(v): parameters with small gradients decay "
                          "far faster than the rest. Use AdamW, whose decay is decoupled from the gradient."
                          if coupled else f"the optimizer ({name}) has (beta1, beta2) = ({beta1}, {beta2}): the second "
                          "moment must average over longer than the first (0 <= beta1 < beta2 < 1, usually 0.9 and "
                          "0.98-0.999), or m / sqrt(v) is no longer bounded and steps overshoot the learning rate."))
            break
    pruned = any(getattr(m, "n_head", 1) == 0 for m in model.modules())
    frozen = [n for n, p in params.items() if not p.requires_grad and p.numel()]
    if frozen and not pruned:
        found.append(("frozen_parameters", f"{module_names(frozen)} have requires_grad=False: they never learn."))
    return found


def module_names(names: list[str], most: int = 4) -> str:
    """'encoder.0.ff, decoder.1.cross_attn and 3 more': the modules of some parameter names."""
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    return ", ".join(modules[:most]) + (f" and {len(modules) - most} more" if len(modules) > most else "")


def data_checks(data) -> list[tuple[str, str]]:
    """The data, before any training: the pairs aligned (source and target lengths correlate in train
    as in validation), no validation or test source in train, each side of validation like the
    same side of train (not source and target swapped), the tokenizers' round trip."""
    import numpy as np
    found, train, val = [], data.splits["train"], data.splits["validation"]
    r = {name: float(np.corrcoef(sp.src_lens, sp.tgt_lens)[0, 1]) if len(sp) > 2 and sp.src_lens.std() and
         sp.tgt_lens.std() else 1.0 for name, sp in (("train", train), ("validation", val))}
    if r["train"] < 0.3 or r["train"] < r["validation"] - 0.3:
        found.append(("misaligned_pairs", f"source and target lengths correlate at r = {r['train']:.2f} in train "
                      f"({r['validation']:.2f} in validation): the pairs are likely misaligned, each source with "
                      "another sentence's translation. Check that both sides are read in the same order, with no "
                      "line dropped or skipped on one side only."))
    seen = set(train.src_text)
    for name in ("validation", "test"):
        sp = data.splits.get(name)
        shared = sum(s in seen for s in sp.src_text) / max(len(sp), 1) if sp is not None else 0.0
        if shared > 0.2:        # (toy:reverse's short digit strings repeat: 9-11%; Multi30k: 0.1%)
            found.append(("split_overlap", f"{shared:.0%} of the {name} sources are also in train: its scores measure "
                          "memory, not translation. Carve the splits apart (by source sentence)."))
    def frequencies(ids) -> np.ndarray:                         # token frequencies, unit length
        n = np.bincount(np.concatenate(list(ids) or [[0]]), minlength=data.src_tok.vocab_size).astype(float)
        return n / (np.linalg.norm(n) + 1e-9)
    val_src = frequencies(val.src(i) for i in range(min(len(val), 1000)))
    cos = {side: float(val_src @ frequencies(getattr(train, side)(i) for i in range(min(len(train), 1000))))
           for side in ("src", "tgt")}
    if data.src_tok is data.tgt_tok and cos["tgt"] > cos["src"] + 0.05:       # (one vocabulary: comparable)
        found.append(("sides_swapped", f"validation's sources look like train's targets (token frequencies: cosine "
                      f"{cos['tgt']:.2f} against {cos['src']:.2f} with train's sources): source and target "
                      "are likely swapped in one split. Check src_lang and tgt_lang for each file."))
    found += tokenizer_round_trip(data)
    return found


def tokenizer_round_trip(data, n: int = 100) -> list[tuple[str, str]]:
    """The first n validation pairs: each side's ids are its tokenizer's encoding of its text, and
    decoding them gives the text back (in most sentences: a character the tokenizer lacks decodes as ⁇)."""
    val, found = data.splits["validation"], []
    for side, tok, texts in (("src", data.src_tok, val.src_text), ("tgt", data.tgt_tok, val.tgt_text)):
        pairs = [(getattr(val, side)(i).tolist(), texts[i]) for i in range(min(n, len(val)))]
        encoded = sum(ids == tok.encode(text) for ids, text in pairs)
        back = sum(tok.decode(ids) == text for ids, text in pairs)
        if encoded < len(pairs) or back < len(pairs) / 2:
            found.append(("tokenizer_round_trip", f"of the first {len(pairs)} validation sentences' {side} side, "
                          f"{encoded} are stored as the tokenizer's encoding of their text and {back} decode back "
                          "to their text: what the model trains on, or what BLEU scores, is not the text. Check "
                          "that each side is encoded with its own tokenizer, that the split gives back each "
                          "sentence's ids whole (its offsets: the end excluded once, not twice), and that decode() "
                          "joins the pieces as encode() split them (no spaces added or lost) and drops only the "
                          "special tokens."))
            break
    return found


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors (of logits, of encoder outputs) differ by more than float rounding: 0.1% of
    their spread (standard deviation), which fp32 rounding stays far under. Their spread, not their
    size: an untrained GRU's logits spread 0.04 around their mean, a real change is small as well."""
    a, b = a.float(), b.float()
    if a.numel() < 2:                       # (nothing, or one number, to compare: no spread)
        return a.numel() == 1 and (a - b).abs().item() > 1e-3 * a.abs().item() + 1e-6
    return (a - b).abs().max().item() > 1e-3 * a.std().item() + 1e-6


def where_they_part(model, run_a, run_b, pick) -> str:
    """Where two runs of the model that should agree first part, as a clause for a warning ('' when no
    module shows it): forward hooks on every submodule keep each call's first input and output
    tensors; pick(a, b) cuts from a pair of them (the same module's k-th call in each run) the parts
    that should be equal, or gives None (not comparable). Going through the calls in the order they
    ran: a module whose input agrees and whose output differs computes something else itself; a
    module whose input differs while every call before it agrees gets it from the plain code (no
    module) of the module that calls it, run between the two."""
    def record(run) -> tuple[dict, collections.Counter]:
        """{(module name, k): [start, first input, end, first output]} of its k-th call; calls per name."""
        calls, count, clock, hooks = {}, collections.Counter(), itertools.count(), []
        for name, module in model.named_modules():
            if not name:
                continue
            def pre(m, args, name=name):
                calls[(name, count[name])] = [next(clock), tensor_in(args), None, None]
                count[name] += 1
            def post(m, args, out, name=name):
                out = out if isinstance(out, tuple) else (out,)
                calls[(name, count[name] - 1)][2:] = [next(clock), tensor_in(out)]
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        return calls, count
    (a, a_count), (b, b_count) = record(run_a), record(run_b)
    keys = [k for k in a if k in b and a_count[k[0]] == b_count[k[0]]]
    events = sorted([(a[k][0], 1, k) for k in keys] + [(a[k][2], 3, k) for k in keys if a[k][2] is not None])
    modules, agreed, code = dict(model.named_modules()), "the model's input", ""

    def owner(name: str) -> str:                                # the module whose code calls this one
        name = name.rsplit(".", 1)[0] if "." in name else ""
        while name and isinstance(modules[name], (torch.nn.ModuleList, torch.nn.Sequential)):
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name
    for _, i, key in events:
        parts = pick(a[key][i], b[key][i]) if a[key][i] is not None and b[key][i] is not None else None
        name, kind = key[0], type(modules[key[0]]).__name__
        if parts is not None and differ(*parts):
            if i == 3:
                return (f"first in `{name}` ({kind}): given the same input, its output differs (it computes with "
                        "something besides its input: a state, a cache, a mask, or over another axis)")
            where = " and ".join(f"`{m}` ({type(modules[m]).__name__})" if m else f"the model ({type(model).__name__})"
                                 for m in dict.fromkeys((code, owner(name))))
            return (f"first at the input of `{name}` ({kind}), while everything before it agrees ({agreed}): "
                    f"the plain code of {where} that runs between them computes it")
        if parts is not None:                   # the code that runs next: this module's own, or its caller's
            agreed, code = f"`{name}`'s {'output' if i == 3 else 'input'}", owner(name) if i == 3 else name
    return ""


def tensor_in(values) -> torch.Tensor | None:
    """The first of a call's arguments (or outputs) if it is a tensor, detached."""
    return values[0].detach() if values and isinstance(values[0], torch.Tensor) else None


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
    """What common.StepLog has checked at each log line and at each step; each warning once per run:
      gradients_kept          a parameter still holds a gradient after the update
      weights_grow            in the first 500 steps, the weight matrices grew to 1.5x their norm
      weights_shrink          ... or shrank to half of it
      weights_frozen          from step 100 to 500, a trainable parameter has not changed since step 1
      overfit_batches_change  in overfit mode, the batch at a position differs from the first epoch's
      batch_repeated          otherwise, a step's batch is the step before's, in the same epoch
      update_ratio            once, the step after the first log line from step 100 on: a module's weight
                              matrices moved by more than a tenth of their size in one update, or by less
                              than a millionth but not 0 (the usual: 1e-4 to 1e-2)"""

    def __init__(self, log, model, overfit: int = 0):
        self.log, self.overfit, self.warned, self.first_norm, self.first_batches = log, overfit, set(), 0.0, {}
        self.last_batch = (-1, torch.zeros(0))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()]
        self.names, self.params, self.first_sums = [n for n, _ in named], [p for _, p in named], []
        self.before: list[torch.Tensor] | None = None           # the weights before the update measured

    def warn_once(self, name: str, text: str, step: int) -> None:
        if name not in self.warned:
            self.warned.add(name)
            self.log.warn(name, text, step)

    def at_step(self, run, batches: list) -> None:
        if self.before:
            self.update_ratio(run.step)
        if self.overfit:
            self.same_batches(run, batches)
        else:
            self.batch_repeated(run, batches)

    def at_log_line(self, step: int, lr: float) -> None:
        self.gradients_cleared(step)
        self.weight_growth(step, lr)
        if step >= 100 and lr > 0 and self.before is None:      # the next step's update is measured
            self.before = [p.detach().clone() for p in self.params]

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
      lr_schedule           the learning rate above its peak (peak_lr), still 0 at step 100, or, a tenth
                            of the run past the warm-up (progress), rising or never yet within half of its peak."""

    def __init__(self, peak_lr: float = 0.0, warmup_frac: float = 0.0):
        self.ln_v, self.top_lr, self.named, self.gains, self.ratios = None, 0.0, set(), [], []
        self.peak_lr, self.warmup_frac, self.progress, self.stuck, self.last_lr = peak_lr, warmup_frac, 0.0, 0, 0.0

    def __call__(self, kind: str, r: dict) -> list[tuple[str, str]]:
        found = []
        if kind == "init":
            self.ln_v = r["ln_v"]
        elif kind == "train" and self.ln_v is not None:
            past_warmup, self.top_lr = r["lr"] < self.top_lr, max(self.top_lr, r["lr"])
            wrong = self.schedule_wrong(r["lr"], r.get("progress", 0.0), r["step"])
            if wrong:
                found.append(("lr_schedule", f"step {r['step']}: {r['progress']:.0%} of the run done, the learning "
                              f"rate {wrong}: the schedule is not what the knobs ask for (warm up to the peak "
                              "over warmup_frac of the run, then fall). Check the schedule's formula (the end of "
                              "its warm-up, its decay) and how the run's progress (a fraction in [0, 1]) is "
                              "computed and fed to it."))
            self.last_lr = r["lr"]
            stuck = past_warmup and r["step"] >= 100 and r["loss"] > self.ln_v - 1.0
            self.stuck = self.stuck + 1 if stuck else 0         # two log lines in a row: not one noisy batch
            if self.stuck >= 2:
                found.append(("loss_stuck", f"step {r['step']}: past the warm-up, the training loss "
                              f"{r['loss']:.2f} has not fallen 1 nat below ln(V) = {self.ln_v:.2f}, uniform guessing. "
                              "Check that the loss gets raw logits (no softmax before the cross-entropy), that the "
                              "optimizer steps the model's parameters, and the learning rate."))
        elif kind == "eval" and r["val_loss"] < 0.35 and r["bleu"] < 10:
            found.append(("teacher_forcing_leak", f"step {r['step']}: validation loss {r['val_loss']:.2f} (nearly "
                          f"always right when shown the target) but greedy BLEU {r['bleu']:.1f}: the decoder sees "
                          "the word it has to predict. Check the causal mask of decoder self-attention and that "
                          "tgt_in is tgt_out shifted right by one (<bos> first)."))
        if kind == "train":
            self.progress = r.get("progress", 0.0)
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
        if lr > 1.05 * self.peak_lr:
            return f"is {lr:.1e}, above its peak {self.peak_lr:.1e}"
        if lr == 0.0 and step >= 100 and progress < 0.9:        # (a decay to min_lr = 0 ends at 0: at the end)
            return f"is still 0 at step {step}, {progress:.1%} of the run done"
        if late and self.top_lr < 0.5 * self.peak_lr:
            return f"has been at most {self.top_lr:.1e}, under half its peak {self.peak_lr:.1e}"
        if late and self.progress >= self.warmup_frac and lr > 1.01 * self.last_lr:     # (the previous record's)
            return f"rose from {self.last_lr:.1e} to {lr:.1e} after the warm-up"
        return ""
