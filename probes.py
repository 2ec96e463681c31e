"""
Probes: the properties a correct encoder-decoder has, tested on the untrained model before step 1
(diagnostics.probe_model runs them and warns about each that fails): what one prediction reads
(Karpathy's dependency probe), a sentence alone as in a batch, word order, training mode reading its
input, no state kept between calls, decoding one token at a time as trained, attention as a
distribution, every parameter learning (held by the model and its optimizer), one training step
following the loss; where two runs that must agree part, locate.py says.
Each probe returns its warnings, [(name, text)], none when the property holds. docs/debugging.md:
the bugs they name.
Leaves out: the data and the loss (diagnostics.py), beam search, a trained model.
"""

import contextlib

import torch

import decoding  # (its functions looked up at each call: a bug put into decoding.py is seen)
from locate import differ, leak_parts, module_names, outermost, step_parts, where_they_part


def ends_in_eos(ids: torch.Tensor, tok) -> bool:
    """Each row (B, L) as training has it: real tokens first, the one <eos> last of them, then pad only."""
    kept = ids != tok.pad_id
    last = ids.gather(1, (kept.sum(1, keepdim=True) - 1).clamp_min(0))[:, 0]
    return bool((kept.cumprod(1).sum(1) == kept.sum(1)).all() and (last == tok.eos_id).all()
                and ((ids == tok.eos_id).sum(1) == 1).all())


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
                 "detached, zeroed or overwritten on the way (the GRU's input at every step), and an initialisation "
                 f"that saturates a gate{gate_bias(model)}.")]
    T = tgt_in.shape[1]
    if T >= 4:
        swapped = tgt_in.clone()
        swapped[:, [1, 2]] = tgt_in[:, [2, 1]]
        if (tgt_in[:, 1] != tgt_in[:, 2]).any() and not differ(model(src, swapped)[:, 3:], logits[:, 3:]):
            found.append(("no_positions", "swapping two target words leaves the predictions after them unchanged: "
                          "the decoder cannot tell the order of the words decoded so far. Add positional encodings "
                          "to the target embeddings too."))
    return found[:1]


def gate_bias(model) -> str:
    """', its GRUs' update gates ... ' where a torch.nn.GRU's update gate z starts above 0.8 on average
    (sigmoid of its biases, b_iz + b_hz; ~0.5 at PyTorch's initialisation), else ''."""
    z = [torch.sigmoid((m.bias_ih_l0 + m.bias_hh_l0).chunk(3)[1]).mean().item() for m in model.modules()
         if isinstance(m, torch.nn.GRU) and getattr(m, "bias", False)]
    if not z or max(z) <= 0.8:
        return ""
    return (f": its GRUs' update gates start at z = {max(z):.2f} on average (the sigmoid of their biases; ~0.5 at "
            "PyTorch's initialisation), and h' = (1 - z) * n + z * h then keeps the old state and lets little of the "
            "input in (biases set to 1, the LSTM forget gate's habit, do this)")


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


def training_mode_reads(model, src, tgt_in, logits) -> list[tuple[str, str]]:
    """In training mode (dropout on) the sentences of a batch still get different logits, about as
    different as in eval mode: dropout keeps 1 - p of each layer's values (scaled by 1 / (1 - p)), and
    nothing else may change between the two modes."""
    with torch.random.fork_rng(devices=[]):                     # (the run's random draws untouched)
        trained = model.train()(src, tgt_in).float()            # (probe_model puts eval mode back)
    spread, wanted = trained.std(dim=0).mean().item(), logits.float().std(dim=0).mean().item()
    if spread < 0.01 * wanted:
        return [("training_mode_blind", f"in training mode every sentence of the batch gets the same logits (their "
                 f"spread across the batch {spread:.1e}, in eval mode {wanted:.1e}): the forward pass in training "
                 "keeps nothing of its input, so the model learns only the targets' frequencies. Check dropout's p "
                 "(nn.Dropout's p is the probability of dropping, not of keeping: p = 1 - keep_prob; dropout=0 "
                 "must give p = 0) and any branch the forward pass takes only in training (model.training).")]
    return []


def no_hidden_state(model, src, tgt_in, logits) -> list[tuple[str, str]]:
    """A model is a function of its input: the same batch gives the same logits after another batch;
    decoding's first step of two rows, then of two others (each with a cache of its own), gives the
    forward pass's logits for the second pair as it did for the first."""
    model(src.roll(1, 0), tgt_in.roll(1, 0))                    # another batch of the same shape
    if differ(model(src, tgt_in), logits):
        return [("hidden_state", "the same batch gave other logits after the model had read another one: state "
                 "carries over between calls (a hidden state kept on the model, a cache not reset, running "
                 "statistics). Start every sentence from a fresh state.")]
    if len(src) < 4:
        return []
    first, _ = model.decode_step(tgt_in[:2, 0], model.encode(src[:2]), None)
    then, _ = model.decode_step(tgt_in[2:4, 0], model.encode(src[2:4]), None)
    if not differ(first, logits[:2, 0]) and differ(then, logits[2:4, 0]):
        return [("hidden_state", "decoding's first step (decode_step, a new cache each time) gives the forward "
                 "pass's logits for two sentences, but not for the next two decoded after them: decoding keeps "
                 "state between calls (the source's keys and values, or a state, kept on a module instead of in "
                 "the cache decode_step is handed and returns). Keep every batch's state in its own cache.")]
    return []


STEPS = 5   # tokens decoded per sentence by the decoding probes (each costs a call of the model); toy:reverse's
#             two sources (6 and 8 tokens with <eos>) keep their own limits under it (4 and 5)


def decoding_as_trained(model, src, tgt_in, logits, data, device) -> list[tuple[str, str]]:
    """Decoding one token at a time (decode_step and its cache) must compute what the teacher-forced
    forward pass does: fed the batch's target inputs one by one, the same logits at every real position.
    Greedy decoding must then be what the forward pass, given greedy's own output, does: at every step
    its token the most likely one, its score their log-probabilities' sum (the start token), each
    sentence of a batch stopping on its own; translate() must encode its sources as training does and
    give greedy decoding's output, in input order, each cut at its own <eos> or its own length limit
    (0.5 * its tokens and <eos> + 1, where that is under STEPS), the same twice from a model left in
    training mode (dropout off while decoding). STEPS tokens each: decode_step on the batch's first two rows, greedy
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
                     f"from position {t} on{'; ' + where if where else ''}: decoding does not compute "
                     "what training trained. Check that each "
                     "step embeds its token as training does (the same scale and dropout off), its position (the "
                     "number of tokens decoded before it), the cache (keys and values appended, not replaced; "
                     "the GRU's hidden state fed back), and the masks decode_step hands the attention.")]
    texts = short_sources(data, 2)[::-1]        # the longer first: translate() sorts, and must put it back
    ids = [src_tok.encode(text) + [src_tok.eos_id] for text in texts]    # padded here, not by decoding's
    two = torch.full((2, max(map(len, ids))), src_tok.pad_id, dtype=torch.long, device=device)
    for i, x in enumerate(ids):                                 # helpers: the reference translate() is
        two[i, :len(x)] = torch.tensor(x, device=device)        # compared with must not share its bugs
    a, b = (0.5, 1) if all(int(0.5 * len(x) + 1) <= STEPS for x in ids) else (0.0, STEPS)
    limits = [int(a * len(x) + b) for x in ids]     # each sentence's own: a * (its tokens and <eos>) + b
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
            k = int(off.nonzero()[0, 0])
            start = " (from its first step: first of all the token it starts from, <bos> as in tgt_in)" if k == 0 else ""
            return [("decoding_mismatch", f"greedy decoding does not choose what the teacher-forced forward pass "
                     f"of its own output ranks first, from step {k} of \"{texts[r][:40]}\" on: greedy decoding "
                     f"does not take the most likely word{start}. Check that it takes the log-softmax and "
                     "the argmax over the whole vocabulary (the last axis, not the batch; over a slice of it, the "
                     "index counts from the slice's start), keeps what it chose (padding only where a sentence has "
                     "finished, not where it goes on), feeds it back as the next step's input, starts from <bos>, "
                     "and adds up the chosen log-probabilities.")]
        direct.append(tgt_tok.decode(hyp[r, :min(n - 1 if len(ended) else n, limits[r])].tolist()))  # to its
        #                                                                               <eos> or its own limit
    return translate_as_greedy(model, data, texts, direct, (a, b), device)


def translate_as_greedy(model, data, texts: list[str], direct: list[str], limit: tuple, device) -> list:
    """translate() of texts, from a model left in training mode, with the length limit (max_len_a, max_len_b),
    must hand the encoder sources as training has them and give `direct`, greedy decoding's output cut
    at each sentence's <eos> or own limit, in input order, the same twice (dropout off while decoding)."""
    src_tok, tgt_tok, (a, b) = data.src_tok, data.tgt_tok, limit
    model.train()                                               # as validation finds it during training
    with encoder_calls(model) as calls:                         # what translate() hands the encoder
        translations = [decoding.translate(model, src_tok, tgt_tok, texts, device=device, max_len_a=a,
                                           max_len_b=b)]
    handed = sorted(tuple(t for t in row.tolist() if t != src_tok.pad_id) for s, _ in calls for row in s)
    wanted = sorted(tuple(src_tok.encode(text) + [src_tok.eos_id]) for text in texts)
    if handed != wanted or not all(ends_in_eos(s, src_tok) for s, _ in calls):
        model.eval()
        return [("decoding_input", "translate() hands the encoder sources that are not as in training (each "
                 "sentence's encoding by the source tokenizer, one <eos> last, then padding only; here "
                 f"{sorted(map(len, handed))} tokens where the sentences' encodings and <eos> have "
                 f"{sorted(map(len, wanted))}): the model translates input it never saw. "
                 "Encode each source as training's data does (the same tokenizer, <eos> appended, padded with "
                 "pad_id after it).")]
    if translations[0] != direct:                               # dropout on, or translate() wrong: which?
        translations.append(decoding.translate(model, src_tok, tgt_tok, texts, device=device, max_len_a=a,
                                               max_len_b=b))
    model.eval()
    if translations[-1] != translations[0]:
        return [("dropout_in_decoding", "greedy decoding of the same 2 short validation sentences twice gave "
                 "different translations: dropout is on while decoding. Call model.eval() before decoding or "
                 "validating, and model.train() after.")]
    got = translations[0]
    if got != direct:
        where = ("the same translations in another order: put them back in input order" if sorted(got) == sorted(direct)
                 else "each a start of the other: cut each at its own <eos> and its own length limit (max_len_a "
                 "times its tokens with <eos>, plus max_len_b), drop only the special tokens"
                 if all(x.startswith(y) or y.startswith(x) for x, y in zip(got, direct)) else "each an end of the "
                 "other: their first tokens dropped or added (greedy decoding's output starts with the first word, "
                 "not <bos>): drop only the special tokens, none by position"
                 if all(x.endswith(y) or y.endswith(x) for x, y in zip(got, direct)) else "other translations: "
                 "check the start and end tokens it passes to greedy decoding (<bos> to start, <eos> to stop)")
        return [("translate_mismatch", f"translate() does not return what greedy decoding of its sentences gives "
                 f"({[t[:30] for t in got]} against {[t[:30] for t in direct]}), {where}.")]
    return []


def short_sources(data, n: int) -> list[str]:
    """The n shortest of the first 20 validation sources, shortest first: the decoding probes' inputs
    (short: each decoded token costs a call of the model)."""
    return sorted((t for t in data.splits["validation"].src_text[:20] if t.strip()), key=len)[:n]


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


def loss_gradient(model, src, tgt_in, tgt_out, loss_fn, data, smoothing: float) -> tuple:
    """The loss as defined on the probe's sentences per target token, loss_fn(model(src, tgt_in), tgt_out)
    over their count (as the training step takes its mean); its gradient, {parameter name: gradient, or
    None where the loss does not reach it}; and the modules with parameters the forward pass calls that
    are not the model's ({id: class name}). every_parameter_learns and step_follows_the_loss share it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mine, outside = {id(m) for m in model.modules()}, {}

    def called(module, args, out):
        if id(module) not in mine and next(module.parameters(), None) is not None:
            outside[id(module)] = type(module).__name__
    watch = torch.nn.modules.module.register_module_forward_hook(called)     # every module's call, anywhere
    try:
        with torch.enable_grad():
            loss = loss_fn(model(src, tgt_in), tgt_out, data.tgt_tok.pad_id, smoothing)
            loss = loss / max(int((tgt_out != data.tgt_tok.pad_id).sum()), 1)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        watch.remove()
    return loss.detach(), dict(zip(params, grads)), outside


def every_parameter_learns(model, grads: dict, outside: dict, optimizer) -> list[tuple[str, str]]:
    """Given the loss's gradient on the probe's sentences and the modules its forward pass called outside
    the model (loss_gradient): every module the forward pass calls is the model's; every trainable
    parameter gets a gradient that is not all zero, and the optimizer holds it, with settings that hold
    (optimizer_settings); no weight matrix starts with all its values equal, no weight (a LayerNorm's gain
    too) all 0, the matrices' median std 0.2-5 / sqrt(fan_in); no module but an embedding is held
    under two names; no parameter is frozen in a model without pruned heads."""
    found = []
    if outside:
        kinds = ", ".join(dict.fromkeys(outside.values()))
        found.append(("unregistered_modules", f"the forward pass calls {len(outside)} modules with parameters ("
                      f"{kinds}) that are not the model's: held in a plain Python list, dict or tuple (or by another "
                      "object), they are not in model.parameters(), so the optimizer never updates them and the "
                      "checkpoint does not save them. Hold sub-modules in nn.ModuleList or nn.ModuleDict, or as "
                      "attributes of a module."))
    names = {}                                  # each module with weights, under every name it is held
    for name, module in model.named_modules(remove_duplicate=False):
        if name and not isinstance(module, torch.nn.Embedding) and next(module.parameters(), None) is not None:
            names.setdefault(id(module), []).append(name)
    twice = [held for held in names.values() if len(held) > 1]
    outer = outermost([held[-1] for held in twice])
    if outer:
        pairs = [held for held in twice if held[-1] in outer]
        found.append(("shared_modules", ", ".join(f"`{b}` is `{a}`" for a, b, *_ in pairs[:3]) + ": one module "
                      "held under two names computes both with one set of weights (and one cache). Build each "
                      "its own module; only embeddings are shared on purpose (tied)."))
    params = dict(model.named_parameters())
    no_grad = [n for n, g in grads.items() if params[n].numel() and (g is None or not g.any())]
    if no_grad:
        found.append(("no_gradient", f"{module_names(no_grad)} get no gradient from the loss: they are not on the "
                      "path from the input to the logits (a tensor detached, a module built but never called, "
                      ".data or torch.no_grad() around a computation), so they never learn."))
    constant = [n for n, p in params.items() if n.endswith("weight") and p.numel() > 1 and (not p.any() or
                p.dim() >= 2 and bool((p == p.flatten()[0]).all()))]       # (a LayerNorm's gain: 1, not 0)
    if constant:
        found.append(("constant_init", f"{module_names(constant)} start with all their weights equal: the units of "
                      "each compute the same thing and get the same gradient, so they never become different (and "
                      "weights of 0 pass no gradient back to what feeds them). Initialise weight matrices at random "
                      "(normal or uniform, scaled by 1 / sqrt(fan_in)); only biases start at 0, and a LayerNorm's "
                      "gain (its weight) at 1."))
    matrices = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Embedding)
                for p in m.parameters(recurse=False) if p.dim() == 2 and min(p.shape) > 1}
    scaled = sorted((float(p.float().std()) * p.shape[1] ** 0.5, p.shape[1]) for n, p in params.items()
                    if id(p) in matrices and n not in constant)     # std x sqrt(fan_in): ~0.6 default, ~1 Xavier
    gain, fan_in = scaled[len(scaled) // 2] if scaled else (1.0, 0)
    if not 0.2 <= gain <= 5.0:
        found.append(("init_scale", f"the weight matrices start with a std of {gain:.2f} / sqrt(fan_in), the median "
                      "over the model's (PyTorch's default initialisation gives 0.58 / sqrt(fan_in), Xavier's about "
                      f"1 / sqrt(fan_in)): each layer {'shrinks' if gain < 1 else 'inflates'} what it is given, so "
                      f"the signal and the gradients {'fade' if gain < 1 else 'blow up'} through the layers. "
                      "Initialise weight matrices with a std of about 1 / sqrt(fan_in) (nn.init.xavier_uniform_, or "
                      "the default)" + (f": a fixed std such as GPT-2's 0.02 suits widths of about 768, not {fan_in}."
                                        if gain < 1 else ".")))
    held = {id(p) for group in (optimizer.param_groups if optimizer is not None else []) for p in group["params"]}
    missed = [n for n, p in params.items() if p.requires_grad and optimizer is not None and id(p) not in held]
    if missed:
        found.append(("not_optimized", f"{module_names(missed)} are trainable but not in the optimizer, which never "
                      "updates them: build the optimizer from model.parameters() after the model is complete."))
    found += optimizer_settings(optimizer, grads) if optimizer is not None else []
    pruned = any(getattr(m, "n_head", 1) == 0 for m in model.modules())
    frozen = [n for n, p in params.items() if not p.requires_grad and p.numel()]
    if frozen and not pruned:
        found.append(("frozen_parameters", f"{module_names(frozen)} have requires_grad=False: they never learn."))
    return found


def optimizer_settings(optimizer, grads: dict) -> list[tuple[str, str]]:
    """Adam's settings hold (its family only: groups with betas): 0 <= beta1 < beta2 < 1; weight decay
    decoupled; eps under the gradient's size (its root mean square over every weight, the mean over
    tokens as the step takes it), or m / (sqrt(v) + eps) is the gradient over eps, not a step of about
    the learning rate."""
    size = torch.cat([g.flatten().float() for g in grads.values() if g is not None] or [torch.ones(1)])
    size = size.pow(2).mean().sqrt().item()
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        betas, eps = group.get("betas"), group.get("eps", 0.0)
        if betas is None:
            continue
        if group.get("weight_decay", 0.0) > 0 and group.get("decoupled_weight_decay") is False:
            return [("optimizer_settings", f"the optimizer ({name}) adds weight decay {group['weight_decay']} to the "
                     "gradient (L2), and Adam divides it by sqrt(v): parameters with small gradients decay far faster "
                     "than the rest. Use AdamW, whose decay is decoupled from the gradient.")]
        if not 0 <= betas[0] < betas[1] < 1:
            return [("optimizer_settings", f"the optimizer ({name}) has (beta1, beta2) = {tuple(betas)}: the second "
                     "moment must average over longer than the first (0 <= beta1 < beta2 < 1, usually 0.9 and "
                     "0.98-0.999), or m / sqrt(v) is no longer bounded and steps overshoot the learning rate.")]
        if eps > size:
            return [("optimizer_settings", f"the optimizer ({name}) has eps = {eps:g}, above the gradient's size at "
                     f"the start ({size:.1e}, its root mean square): Adam's step m / (sqrt(v) + eps) is then about "
                     "the gradient over eps, far smaller than the learning rate, and the model hardly learns. Keep "
                     "eps far under the gradients (1e-8 or 1e-9 is usual; 1e-6 at most).")]
    return []


def step_follows_the_loss(model, src, tgt_in, tgt_out, gradient: tuple, step) -> list[tuple[str, str]]:
    """One training step as the loop takes it (step: train.train_step on these sentences, with an
    optimizer that keeps what it is handed and changes nothing) hands optimizer.step() the gradient of
    the loss as defined (gradient: loss_gradient's, with the run's smoothing), up to its scale (the mean
    over tokens, clipping by norm): their cosine ~1 and the step's loss per token the loss's (dropout
    off: the same computation)."""
    (loss, grads, _), kept = gradient, KeptGradients(model)
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    weights = {name: p.detach().clone() for name, p in named.items()}                 # (put back after)
    try:
        with torch.enable_grad():
            report = step([(src.cpu(), tgt_in.cpu(), tgt_out.cpu())], kept)
    except Exception as e:              # the model and the loss took these sentences (loss_gradient)
        kept.zero_grad()
        return [("step_gradient", f"one training step as the loop takes it (train.train_step) fails with "
                 f"{type(e).__name__} ({str(e)[:120]}) on sentences that model(src, tgt_in) and the loss take: "
                 "the step calls them otherwise. Check what it passes and in which order: model(src, tgt_in), "
                 "loss(logits, tgt_out, pad_id, smoothing).")]
    finally:
        changed = [n for n, p in named.items() if not torch.equal(p.detach(), weights[n])]
        with torch.no_grad():
            for n in changed:
                named[n].copy_(weights[n])
    if changed:
        return [("step_gradient", f"one training step as the loop takes it (train.train_step), with an optimizer "
                 f"whose step() changes nothing, changes the weights of {module_names(changed)}: the step writes to "
                 "the weights outside optimizer.step(). Check what it does to the parameters themselves (clipping "
                 "scales the gradients, p.grad, not the weights; no update of p.data by hand; weight decay only "
                 "in the optimizer).")]
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()  # noqa: E731
                                 for g, p in zip(gs, params)])
    if not kept.stepped and report.get("update") == "done":
        return [("step_gradient", "one training step as the loop takes it (train.train_step) reports an update "
                 "but never calls optimizer.step(): a condition skips it. Only a non-finite loss or gradient "
                 "skips a step; a large gradient norm is scaled down to grad_clip (clip_grad_norm_), not "
                 "thrown away.")]
    if not kept.grads:
        return [("step_gradient", "one training step as the loop takes it (train.train_step) hands "
                 "optimizer.step() no gradient: they are cleared or never made before the update (zero_grad() "
                 "between backward() and step(); backward() never called, or on a detached loss).")] \
            if report.get("update") == "done" else []
    got, wanted = flat([kept.grads.get(id(p)) for p in params]), flat(grads.values())
    cos = (got @ wanted / (got.norm() * wanted.norm()).clamp_min(1e-30)).item()
    per_token = loss.item()                                     # (loss_gradient's: per target token)
    stepped = report.get("loss", per_token)                     # (the mean over the target tokens)
    if cos < 0.99 or abs(stepped - per_token) > 0.01 * abs(per_token) + 1e-6:
        return [("step_gradient", f"one training step as the loop takes it (train.train_step) does not follow the "
                 f"loss as defined on the same sentences: its loss {stepped:.3f} per token against {per_token:.3f}, "
                 f"its gradient's cosine with the loss's {cos:.3f} (at init a gradient mostly points the same way "
                 "whatever the targets: the loss tells more): the step optimises something else. Check what the "
                 "step hands the loss (the logits and tgt_out as the batch has them: no second shift or slice, "
                 "tgt_out and not tgt_in, the run's smoothing, the mean over all target tokens), that backward() is "
                 "called on that loss, and what changes the gradients before optimizer.step() (clipping by norm "
                 "scales them all alike; by value, or per parameter, turns them).")]
    return []


class KeptGradients:
    """An optimizer stand-in for one probe step: step() keeps a copy of the gradients it is handed and
    changes no weight; zero_grad() clears them as the real one does."""
    def __init__(self, model):
        self.param_groups, self.grads = [{"params": list(model.parameters()), "lr": 0.0}], {}
        self.stepped = False

    def step(self) -> None:
        self.grads = {id(p): p.grad.detach().clone() for p in self.param_groups[0]["params"] if p.grad is not None}
        self.stepped = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None


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
