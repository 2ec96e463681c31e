"""
Diagnostics: warnings in train.py's log that name a classic seq2seq bug, each with its likely
cause and its fix: a line "warning: ..." and a record {"kind": "warning", "name": ...} of log.jsonl.
train_loop wires them in, by when they look:

    check_initial_loss, probe_model   before step 1: the untrained model (probes.py: what it reads, decoding
                  = training, ...), the first batch, the loss function, the optimizer, the data and the
                  validation's scoring, tested for the properties a correct encoder-decoder and its training have
    StepChecks    in common.StepLog, at every log line: the weights and gradients; at every step: the batch
                  moving on (in overfit mode: staying the same)
    Symptoms      in common.RunLog, at every record: the loss against ln(V), the learning rate's schedule,
                  validation loss against BLEU, what its source is worth to the model, the translations' length
docs/debugging.md: the bugs they name (tools/bugs.py, thirteen held-out sets among them), what they do not
name, and their cost. Leaves out: statistics of activations, a learning-rate finder, beam search.
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
from probes import differ, ends_in_eos, module_names


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
      batch_of_the_split    ... and its rows pairs of the training split's texts; the first epoch's
                            batches (of batches: batching.TrainBatches) each training sentence once,
                            cut to batch_tokens
      reads_what_it_should  one prediction's gradient reaches every real source token, every encoder
                            output it attends to, its target inputs up to its own, nothing else
      alone_as_in_a_batch   a sentence's logits alone are its logits in the batch, padding and all
      as_the_textbook       every stage (embeddings, layers, attention weights, the GRU's summary and
                            first state, logits) is what textbook.py computes from the model's weights
      word_order            the prediction responds to the word it is given; the encoder and the
                            decoder tell a sentence from its words reordered
      training_mode_reads   in training mode (dropout on) the sentences still get different logits
      no_hidden_state       the same batch twice, another between: the same logits
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
    precision: 0.8 of a Multi30k bf16 training step, 2.6-4.0 of the toy task's (docs/debugging.md)."""
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
    if not torch.equal(tgt_in.masked_fill(~real, pad), shifted) or not ends_in_eos(tgt_out, data.tgt_tok) or \
            not ends_in_eos(src, data.src_tok):
        return [("target_shift", "the training batch does not pair tgt_in with tgt_out for teacher forcing: at "
                 "each position the decoder must read the previous target word (tgt_in = <bos> + tgt_out shifted "
                 "right by one) and predict the current one; the source and tgt_out end in one <eos>, and after "
                 "it comes padding (pad_id) only. Check collate's shift, the special tokens and the padding id.")]
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
    evaluate (decoding.evaluate, as train.validate calls it) on n validation pairs, with
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
        got = evaluate(model, dataclasses.replace(data, splits={**data.splits, "validation": few}), 10**6, device,
                       None, n_sentences=len(rows))
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
             "sentence scores).")]


def validation_loss(model, data, few: Split, reported: float, device) -> list[tuple[str, str]]:
    """The validation loss evaluate() reported on the pairs of `few` is the model's cross-entropy on them:
    model(src, tgt_in) against tgt_out, batched here apart from collate, per real target token, no
    smoothing, dropout off."""
    model.eval()
    src_tok, tgt_tok = data.src_tok, data.tgt_tok
    sources = [list(few.src(i)) + [src_tok.eos_id] for i in range(len(few))]
    targets = [list(few.tgt(i)) for i in range(len(few))]

    def padded(seqs: list, pad: int) -> torch.Tensor:
        return torch.tensor([x + [pad] * (max(map(len, seqs)) - len(x)) for x in seqs], device=device)
    src, pad = padded(sources, src_tok.pad_id), tgt_tok.pad_id
    tgt_in = padded([[tgt_tok.bos_id] + y for y in targets], pad)
    tgt_out = padded([y + [tgt_tok.eos_id] for y in targets], pad)
    wanted = torch.nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1).float(), tgt_out.flatten(),
                                               ignore_index=pad).item()
    if abs(reported - wanted) <= 1e-4 * (1 + wanted):           # (float rounding: ~1e-6)
        return []
    return [("validation_loss", f"the validation loss evaluate() reports on {len(few)} validation pairs, "
             f"{reported:.3f}, is not the model's cross-entropy on them, {wanted:.3f} (model(src, tgt_in) "
             "against tgt_out, no smoothing, per real target token, dropout off): the validation loss measures "
             "something else. Check what evaluate() scores the logits against (tgt_out, not tgt_in), its "
             "smoothing (none), what it divides by (the real target tokens) and that it runs the model in eval "
             "mode.")]


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
                            where every decay is still above half of it).
      validation_unchanged  two validations in a row give the same loss to the last digit while the
                            training loss fell by over 0.1 nats: the model validated is not the one trained."""

    def __init__(self, peak_lr: float = 0.0, warmup_frac: float = 0.0):
        self.ln_v, self.top_lr, self.named, self.gains, self.ratios = None, 0.0, set(), [], []
        self.peak_lr, self.warmup_frac, self.progress, self.stuck, self.last_lr = peak_lr, warmup_frac, 0.0, 0, 0.0
        self.near_peak = False          # a record logged within a tenth of the run after the warm-up's end
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
        return ""
