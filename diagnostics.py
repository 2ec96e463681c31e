"""
Diagnostics before step 1: warnings in train.py's log that name a classic seq2seq bug, each with its
likely cause and its fix: a line "warning: ..." and a record {"kind": "warning", "name": ...} of
log.jsonl. train_loop calls check_initial_loss and probe_model once, before step 1: the untrained
model (probes.py: what it reads, decoding = training, ...; textbook.py: every stage as the papers
write it), the first batch and epoch, the loss function, the optimizer, the data and the
validation's scoring, tested for the properties a correct encoder-decoder and its training have.
The run as it goes is watch.py's. docs/debugging.md: the bugs they name (tools/bugs.py, fifteen
held-out sets among them), what they do not name, and their cost. Leaves out: beam search.
"""

import dataclasses
import functools
import math

import torch
from sacrebleu.metrics import BLEU

import decoding
import probes
import textbook
from data import Split
from locate import differ
from probes import ends_in_eos


@torch.no_grad()
def check_initial_loss(model, batch: tuple, loss_fn, data, log) -> None:
    """An untrained model should be as unsure as uniform guessing: loss close to ln(V) (with logits of
    unit variance, ~0.5 nats above it whatever V is). Far above: over-confident first guesses (weights
    too large, a wrong output layer); below: the model sees the word it must predict (a leaking mask)
    or the loss is divided by the wrong count. docs/robustness.md says why the tolerance is 1 nat below
    and 2 above. On the batch's first 32 sentences: an untrained model's loss hardly varies between them.
    Logs an "init" record (step 0's loss and ln(V)), which Symptoms reads."""
    pad_id, device = data.tgt_tok.pad_id, next(model.parameters()).device
    model.eval()
    src, tgt_in, tgt_out = (t[:32].to(device) for t in batch)  # (32 sentences: ~0.02 nats of noise at init)
    loss = (loss_fn(model(src, tgt_in), tgt_out, pad_id, 0.0) / (tgt_out != pad_id).sum()).item()   # (in fp32)
    model.train()
    ln_v = math.log(data.tgt_tok.vocab_size)
    log.record("init", f"step 0: loss {loss:.3f}, ln(V) = {ln_v:.3f} ({loss - ln_v:+.2f} nats)",
               step=0, loss=loss, ln_v=ln_v)
    if not -1.0 <= loss - ln_v <= 2.0:     # (five seeds of config/toy_reverse.py: +0.2 to +1.8)
        log.warn("initial_loss", f"the initial loss is {loss - ln_v:+.1f} nats from ln(V): check the weight "
                 "initialisation, the output layer and the loss masking")


@torch.no_grad()
def probe_model(model, batch: tuple, loss_fn, data, log, optimizer=None, smoothing: float = 0.0,
                rows: int = 4, step=None, evaluate=None, batches=None) -> list[str]:
    """Before step 1, test the untrained model on a few sentences of the first batch (the sources cut to
    mixed lengths) for the properties a correct encoder-decoder has, whatever the bug that breaks them
    (probes.py); warn about each that fails, print the list of those that hold, and return it:
      teacher_forcing_pairs the first batch: tgt_in = <bos> + tgt_out shifted right, one <eos> ending
                            each side, then padding only
      batch_of_the_split    ... its rows the split's pairs; the first epoch's batches (batches: a
                            TrainBatches) each training sentence once, cut to batch_tokens
      reads_what_it_should  one prediction's gradient reaches every real source token, every encoder
                            output it attends to, its target inputs up to its own, nothing else
      alone_as_in_a_batch   a sentence's logits alone are its logits in the batch, padding and all
      as_the_textbook       every stage (embeddings, layers, attention weights, the GRU's summary and
                            first state, logits) is what textbook.py computes from the model's weights
      word_order            the prediction responds to the word it is given; the encoder and the
                            decoder tell a sentence from its words reordered
      training_mode_reads   in training mode (dropout on) the sentences still get different logits
      no_hidden_state       the same batch twice, another between: the same logits; decoding's too
      decoding_as_trained   decode_step gives the teacher-forced logits; greedy picks what the forward
                            pass ranks first; translate() encodes as training does, gives greedy's output
      loss_as_defined       each position's cross-entropy (smoothed) and gradient p - q; padding free
      attention_as_designed weights distributions, scores spread as 1 / sqrt(Dh) makes them; codes sane
      every_parameter_learns  every module called is the model's, held once; every parameter starts at
                            random, gets a gradient, is in the optimizer, whose settings hold
      step_follows_the_loss one step as the loop takes it (step(micro_batches, optimizer): train_step)
                            hands optimizer.step() the loss's gradient and writes no weight itself
      data_pairs            data_checks: the pairs aligned, the splits apart, the sides, spaces, most
                            pairs kept, each side's ids its text's encoding, decoding back to it
      scores_an_oracle      the run's evaluate reports an oracle's corpus BLEU and the model's loss
    A probe that raises is a warning (probe_failed): a diagnostic never stops a run. Once, in full
    precision: 0.7-0.8 of a Multi30k bf16 training step, 2.3-3.1 of the toy task's (docs/debugging.md)."""
    was_training, device = model.training, next(model.parameters()).device
    src, tgt_in, tgt_out = (t[:rows].to(device) for t in batch)
    src = torch.cat([src, torch.full_like(src[:, :3], data.src_tok.pad_id)], dim=1)   # padding for sure
    src = probes.mixed_lengths(src, data.src_tok)
    model.eval()
    logits = model(src, tgt_in)                                 # (rows, T, V): what each probe compares with
    gradient = functools.cache(lambda: probes.loss_gradient(model, src, tgt_in, tgt_out, loss_fn, data, smoothing))
    checks = {"teacher_forcing_pairs": lambda: teacher_forcing_pairs(batch, data),
              "batch_of_the_split": lambda: batch_of_the_split(batch, data) + an_epoch_of_the_split(batches, data),
              "reads_what_it_should": lambda: probes.dependency_probe(model, src, tgt_in, tgt_out, data),
              "alone_as_in_a_batch": lambda: probes.alone_as_in_a_batch(model, src, tgt_in, logits, data),
              "as_the_textbook": lambda: textbook.as_the_textbook(model, src, tgt_in, logits, data),
              "word_order": lambda: probes.word_order(model, src, tgt_in, logits, data),
              "training_mode_reads": lambda: probes.training_mode_reads(model, src, tgt_in, logits),
              "no_hidden_state": lambda: probes.no_hidden_state(model, src, tgt_in, logits),
              "decoding_as_trained": lambda: probes.decoding_as_trained(model, src, tgt_in, logits, data, device),
              "loss_as_defined": lambda: loss_as_defined(tgt_out, loss_fn, data, smoothing),
              "attention_as_designed": lambda: probes.attention_as_designed(model, src, tgt_in),
              "every_parameter_learns": lambda: probes.every_parameter_learns(model, *gradient()[1:], optimizer),
              "step_follows_the_loss": lambda: probes.step_follows_the_loss(model, src, tgt_in, tgt_out, gradient(),
                                                                            step),
              "data_pairs": lambda: data_checks(data),
              "scores_an_oracle": lambda: scores_an_oracle(model, data, evaluate, device)}
    if step is None:                            # (several processes, or fp16's scaler: not probed)
        del checks["step_follows_the_loss"]
    if evaluate is None:
        del checks["scores_an_oracle"]
    results = {}
    for name, probe in checks.items():
        try:
            results[name] = probe()
        except Exception as e:          # a diagnostic never stops a run: the model failed the probe instead
            results[name] = [("probe_failed", f"the probe {name} (diagnostics.probe_model) failed on the untrained "
                              f"model with {type(e).__name__}: {str(e)[:200]}. The model does not behave as an "
                              "encoder-decoder is expected to (a tensor detached or computed under no_grad where "
                              "the loss needs its gradient, a shape the model does not expect); training goes on.")]
        if model.training:                              # (a probe that left dropout on; eval() sets an
            model.eval()                                # attribute on every module: only where needed)
    model.train(was_training)
    for found in results.values():
        for name, text in found:
            log.warn(name, text)
    passed = [name for name, found in results.items() if not found]
    log.say(f"checked before step 1 ({len(passed)} of {len(results)} hold; diagnostics.py): {', '.join(passed)}\n"
            "  watched from here: batches moving on, gradients cleared, weights moving and not blowing up, the "
            "training mode, loss spikes, the loss against ln(V), the learning rate's schedule, what the source is "
            "worth, the translations' length and the validated model being the trained one\n"
            "  can it overfit one batch? --overfit_batches=1")
    return passed


def batch_of_the_split(batch: tuple, data, rows: int = 32) -> list[tuple[str, str]]:
    """The first batch's rows are pairs of the training split: each row's source and target, decoded up
    to their <eos>, are one of its (source, target) texts (most rows: a character a tokenizer lacks
    decodes as ⁇)."""
    src, _, tgt_out = (t[:rows] for t in batch)
    train = data.splits["train"]

    def text(ids: torch.Tensor, tok) -> str:         # (cut at <eos> here, not by decoding.strip_special:
        ids = ids.tolist()                              # a check must not share the code it may blame)
        return tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
    seen = [(text(s, data.src_tok), text(t, data.tgt_tok)) for s, t in zip(src, tgt_out)]
    known = set(seen).intersection(zip(train.src_text, train.tgt_text))     # (no set of the whole split)
    strange = [pair for pair in seen if pair not in known]
    if len(strange) > len(seen) / 5:
        return [("batch_pairs", f"{len(strange)} of the first batch's {len(seen)} sentences are not pairs of the "
                 f"training split (\"{strange[0][0][:30]}\" -> \"{strange[0][1][:30]}\", decoded, is none): the model "
                 "trains on something else than the data. Check how collate builds each row from the split: the "
                 "source and the target of the same sentence, their ids as stored (nothing reversed, cut or "
                 "added), and the indices the batch is taken at.")]
    return []


def an_epoch_of_the_split(batches, data) -> list[tuple[str, str]]:
    """The first epoch's batches (of batching.TrainBatches; None: not checked) hold each training sentence
    once, and are cut to batch_tokens: their median padded size (counted here as batching.batch_cost
    counts it: sentences x (longest source + longest target, with <eos> and <bos>)) over half of it, in
    an epoch of 4 batches or more; none of 2 sentences or more over it."""
    if batches is None:
        return []
    epoch, budget, sp = batches.of_epoch(0), batches.batch_tokens, data.splits["train"]
    held = torch.cat([torch.as_tensor(idx, dtype=torch.long) for idx in epoch] or [torch.zeros(0).long()])
    n, distinct = len(sp), len(torch.unique(held))
    if len(held) != n or distinct != n or n and not (0 <= held.min() and held.max() < n):
        return [("epoch_of_the_split", f"the first epoch's training batches hold {len(held):,} sentences ("
                 f"{distinct:,} distinct), the training split {n:,}: the batches are not cut from the training "
                 "split (another split's lengths or sentences), or they drop or repeat some. Make the batches from "
                 "data.splits['train'] (its lengths and its sentences), each sentence once per epoch.")]
    sizes = torch.tensor([[len(idx) * (int(sp.src_lens[idx].max()) + int(sp.tgt_lens[idx].max()) + 2), len(idx)]
                          for idx in epoch if len(idx)]).reshape(-1, 2)          # (padded tokens, sentences)
    over = sizes[(sizes[:, 0] > budget) & (sizes[:, 1] > 1)]
    median = float(sizes[:, 0].float().median()) if len(sizes) else 0.0
    if not len(over) and (len(sizes) < 4 or median >= budget / 2):
        return []
    told = (f"{len(over)} hold more ({int(over[0, 1])} sentences in {int(over[0, 0]):,} padded tokens)" if len(over)
            else f"the median holds {median:,.0f} padded tokens")
    return [("batch_size", f"batch_tokens={budget:,} asks for batches of that many padded tokens (sentences x "
             f"(longest source + longest target), with <eos> and <bos>); of the first epoch's {len(sizes):,} "
             f"batches, {told}: the batches are not cut to the budget the run was tuned for (too small: each step "
             "sees a fraction of the data, its gradient noisy; too large: memory). Check how make_batches counts "
             "a batch's cost, n x (longest source + longest target), padding included, and that it adds "
             "sentences while that stays within batch_tokens.")]


def teacher_forcing_pairs(batch: tuple, data) -> list[tuple[str, str]]:
    """A training batch as teacher forcing needs it: tgt_in is <bos> then tgt_out shifted right by one;
    the source and tgt_out each hold one <eos>, at the end of their real tokens, and after it only padding."""
    src, tgt_in, tgt_out = batch
    pad, bos = data.tgt_tok.pad_id, data.tgt_tok.bos_id
    real = tgt_out != pad
    shifted = torch.cat([torch.full_like(tgt_out[:, :1], bos), tgt_out[:, :-1]], dim=1).masked_fill(~real, pad)
    failed = [what for what, holds in (
        ("tgt_in is not <bos> + tgt_out shifted right by one", torch.equal(tgt_in.masked_fill(~real, pad), shifted)),
        ("tgt_out's rows do not end in one <eos>, then padding", ends_in_eos(tgt_out, data.tgt_tok)),
        ("the source's rows do not end in one <eos>, then padding", ends_in_eos(src, data.src_tok))) if not holds]
    if failed:
        wrong = failed[0]
        return [("target_shift", f"the training batch is not as teacher forcing needs it: {wrong}. At each position "
                 "the decoder must read the previous target word (tgt_in = <bos> + tgt_out shifted right by one) and "
                 "predict the current one; the source and tgt_out end in one <eos>, and after it comes padding "
                 "(pad_id) only (translate() encodes sources as training has them). Check collate's shift, the "
                 "special tokens it adds to each side and the padding id.")]
    return []


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


def scores_an_oracle(model, data, evaluate, device, n: int = 4) -> list[tuple[str, str]]:
    """The validation scores as sacreBLEU does, and reports the model's loss (validation_loss): the run's
    evaluate (decoding.evaluate, as train.validate calls it) on n validation pairs, a batch each, with
    decoding.translate replaced by an oracle that gives each source its own reference (all but the
    first less their last word), must report the corpus BLEU of those translations against the
    references of their own sources, in order. Not tested: an evaluate that never calls
    decoding.translate, and references without a 4-gram among them (BLEU 0 whatever is compared)."""
    val = data.splits["validation"]
    first = {}                                  # n pairs whose sources are distinct: the oracle's lookup
    for i, text in enumerate(val.src_text[:50]):
        first.setdefault(text, i)
    rows = list(first.values())[:n]
    few = Split([val.src(i) for i in rows], [val.tgt(i) for i in rows], [val.src_text[i] for i in rows],
                [val.tgt_text[i] for i in rows])
    given = {src: ref if k == 0 else " ".join(ref.split()[:-1]) or ref
             for k, (src, ref) in enumerate(zip(few.src_text, few.tgt_text))}
    asked = []

    def oracle(model, src_tok, tgt_tok, sentences: list[str], **kwargs) -> list[str]:
        asked.extend(sentences)
        return [given.get(text, "") for text in sentences]
    translate, decoding.translate = decoding.translate, oracle
    try:
        got = evaluate(model, dataclasses.replace(data, splits={**data.splits, "validation": few}), 1, device,
                       None, n_sentences=len(rows))         # (a budget of 1 token: a batch per sentence)
    finally:
        decoding.translate = translate
    found = validation_loss(model, data, few, got["loss"], device)
    wanted = BLEU().corpus_score([given[s] for s in few.src_text], [few.tgt_text]).score
    if found or not asked or wanted == 0 or abs(got["bleu"] - wanted) <= 0.01:
        return found
    strangers = [text for text in asked if text not in given]
    seen = (f"translate() was asked for {len(strangers)} sentences that are not the split's sources "
            f"(\"{strangers[0][:40]}\")" if strangers else
            f"translate() was asked for the split's {len(asked)} sources")
    return [("scoring", f"validation scores an oracle's translations (each source's own reference, all but the "
             f"first less their last word) at BLEU {got['bleu']:.1f}, where sacreBLEU's corpus BLEU of them against "
             f"the references of their own sources is {wanted:.1f} ({seen}): BLEU does not compare each translation "
             "with the reference of its own source, over the corpus. Check what evaluate() hands translate() and "
             "score(): the split's sources, and the same split's targets as the references (not its sources, not "
             "another split's), the same sentences in the same order (translate() gives its outputs in input "
             "order); and that score() takes sacreBLEU's corpus_score over all the sentences (not a mean of "
             "sentence scores), of their text (the strings, not their ids or tokens).")]


def validation_loss(model, data, few: Split, reported: float, device) -> list[tuple[str, str]]:
    """The validation loss evaluate() reported on the pairs of `few`, a batch each, is the model's
    cross-entropy on them: model(src, tgt_in) against tgt_out, each sentence alone (made here apart
    from collate: <eos> after the source, <bos> + target in, target + <eos> out), per real target
    token of them all, no smoothing, dropout off."""
    model.eval()
    src_tok, tgt_tok, summed, count = data.src_tok, data.tgt_tok, 0.0, 0
    for i in range(len(few)):
        src = torch.tensor([list(few.src(i)) + [src_tok.eos_id]], device=device)
        tgt_in = torch.tensor([[tgt_tok.bos_id] + list(few.tgt(i))], device=device)
        tgt_out = torch.tensor([list(few.tgt(i)) + [tgt_tok.eos_id]], device=device)
        summed += torch.nn.functional.cross_entropy(model(src, tgt_in)[0].float(), tgt_out[0], reduction="sum").item()
        count += tgt_out.numel()
    wanted = summed / count
    if abs(reported - wanted) <= 1e-4 * (1 + wanted):           # (float rounding: ~1e-6)
        return []
    return [("validation_loss", f"the validation loss evaluate() reports on {len(few)} validation pairs, "
             f"{reported:.3f}, is not the model's cross-entropy on them, {wanted:.3f} (model(src, tgt_in) "
             "against tgt_out, no smoothing, per real target token, dropout off; a batch each): the validation "
             "loss measures something else. Check what evaluate() scores the logits against (tgt_out, not tgt_in), "
             "its smoothing (none), that it adds up every batch's loss (+=, not =) and divides by the real target "
             "tokens of all of them, and that it runs the model in eval mode.")]


def data_checks(data) -> list[tuple[str, str]]:
    """The data, before any training: the pairs aligned (source and target lengths correlate in train
    as in validation), no validation or test source in train, each side of validation like the
    same side of train (not source and target swapped), validation's references holding spaces (BLEU's
    words), every split keeping at least half the pairs loaded, the tokenizers' round trip."""
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
    def frequencies(ids: np.ndarray) -> np.ndarray:             # token frequencies, unit length
        n = np.bincount(ids, minlength=data.src_tok.vocab_size).astype(float)
        return n / (np.linalg.norm(n) + 1e-9)
    k, j = min(len(val), 1000), min(len(train), 1000)           # the first 1000 sentences of each
    val_src = frequencies(val.src_flat[:val.src_off[k]])
    cos = {"src": float(val_src @ frequencies(train.src_flat[:train.src_off[j]])),
           "tgt": float(val_src @ frequencies(train.tgt_flat[:train.tgt_off[j]]))}
    if data.src_tok is data.tgt_tok and cos["tgt"] > cos["src"] + 0.05:       # (one vocabulary: comparable)
        found.append(("sides_swapped", f"validation's sources look like train's targets (token frequencies: cosine "
                      f"{cos['tgt']:.2f} against {cos['src']:.2f} with train's sources): source and target "
                      "are likely swapped in one split. Check src_lang and tgt_lang for each file."))
    long = [t for t in val.tgt_text[:1000] if len(t) >= 10]        # (the side BLEU scores)
    unsplit = sum(not any(c.isspace() for c in t) for t in long)
    if long and unsplit > len(long) / 2:
        found.append(("text_without_spaces", f"{unsplit} of the "
                      f"{len(long)} validation references of 10 characters or more hold no space "
                      f"(\"{long[0][:40]}\"): BLEU's words (13a) are what spaces separate, so each is one word "
                      "and BLEU is about 0 whatever the translations. The spaces were lost before anything "
                      "saw the text (cleaning whitespace with ''.join(s.split()), not ' '.join), or the "
                      "language is written without them (score it with sacreBLEU's tokenize='zh', "
                      "'ja-mecab' or 'char')."))
    for name, r in data.report.items():     # (the cleaning and the length filters of data.build_data)
        if r.get("loaded") and r["kept"] < 0.5 * r["loaded"]:
            why = ", ".join(f"{r[k]:,} {k}" for k in ("bad_rows", "empty", "too_long", "bad_ratio") if r.get(k))
            found.append(("pairs_dropped", f"the {name} split keeps {r['kept']:,} of the {r['loaded']:,} pairs loaded "
                          f"({why or 'dropped without a count'}): its cleaning throws most of the corpus away (unless "
                          "max_len or max_len_ratio was set that tight on purpose). Check each filter's condition "
                          "(which pairs it keeps, not drops), the unit of max_len (tokens, not characters) and "
                          "max_len_ratio."))
    found += tokenizer_round_trip(data)
    return found


def tokenizer_round_trip(data, n: int = 100) -> list[tuple[str, str]]:
    """The first n validation pairs, stage by stage: decoding a text's encoding gives the text back
    (the tokenizer; in most sentences: a character it lacks decodes as ⁇), and each side's stored ids
    are that encoding (the split). The warning names the stage that fails and shows a sentence."""
    val = data.splits["validation"]
    sides = (("src", data.src_tok, val.src_text, val.tgt_text), ("tgt", data.tgt_tok, val.tgt_text, val.src_text))
    for side, tok, texts, other_texts in sides:
        stored = [getattr(val, side)(i).tolist() for i in range(min(n, len(val)))]
        encoded = [tok.encode(text) for text in texts[:len(stored)]]
        lost = [i for i, ids in enumerate(encoded) if tok.decode(ids) != texts[i]]
        wrong = [i for i, ids in enumerate(encoded) if stored[i] != ids]
        if len(lost) > len(stored) / 2:
            i, unk = lost[0], getattr(tok, "unk_id", None)
            unknown = sum(unk in encoded[j] for j in lost)          # pieces the vocabulary does not hold
            why = (f"In {unknown} of them encode() gives <unk> (⁇): the vocabulary lacks pieces that are common in "
                   "the text. Check how it is built from the training text: every piece counted, the most frequent "
                   "kept, none skipped (the special tokens shift the ids, they do not push out the commonest "
                   "pieces), vocab_size large enough." if unknown > len(lost) / 2 else
                   "Check that decode() joins the pieces as encode() split them (no spaces added or lost) and "
                   "drops only the special tokens.")
            return [("tokenizer_round_trip", f"the {side} tokenizer does not give its text back: of the first "
                     f"{len(stored)} validation sentences, {len(lost)} decode(encode(text)) to other text (\""
                     f"{texts[i][:40]}\" comes back as \"{tok.decode(encoded[i])[:40]}\"): what the model learns, "
                     f"or what BLEU scores, is not the text. {why}")]
        if wrong:
            i = wrong[0]
            how = ids_against(stored[i], encoded[i], tok.encode(other_texts[i]))
            return [("tokenizer_round_trip", f"of the first {len(stored)} validation sentences' {side} side, "
                     f"{len(wrong)} are not stored as their text's encoding, though the tokenizer gives the text "
                     f"back: the split's ids are wrong (sentence {i}: {how}). "
                     "Check how each side is encoded (its own tokenizer, its own text) and how a sentence's ids are "
                     "read back from the split (its offsets: the end excluded once, not twice).")]
    return []


def ids_against(stored: list[int], encoded: list[int], other: list[int]) -> str:
    """How a sentence's stored ids differ from its text's encoding (other: the other side's text's)."""
    n, m = len(stored), len(encoded)
    if stored == other:
        return "its ids are the encoding of the other side's text"
    if n < m and (stored == encoded[:n] or stored == encoded[m - n:]):
        return f"{n} ids stored, the encoding less its {'last' if stored == encoded[:n] else 'first'} {m - n}"
    if n > m and (stored[:m] == encoded or stored[n - m:] == encoded):
        return f"{n} ids stored, the encoding and {n - m} more"
    k = next((k for k, (a, b) in enumerate(zip(stored, encoded)) if a != b), min(n, m))
    return f"{n} ids stored against {m} in its encoding, the first difference at id {k}"
