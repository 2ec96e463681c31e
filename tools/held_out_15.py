"""
Held-out set 15 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 14. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_15
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import batching  # noqa: E402
import decoding  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")


# --- batching.py ----------------------------------------------------------------------

def collate_source_without_eos():
    """The learner's collate leaves the source as it is, ids only, 'the source needs no <eos>, the
    model is not asked to end it': training and the validation loss never show the encoder an <eos>,
    while translation (decoding.length_sorted_batches) appends one to every source, as it should. At
    translation time every sentence ends in a token whose embedding was never trained."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)] = s                                         # BUG: src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = collate
    decoding.collate = collate


# --- train.py -------------------------------------------------------------------------

def gru_train_loss_mean_per_sentence():
    """The learner averages the loss over the batch's sentences, as in an image classifier, dividing
    the summed token loss by len(tgt_out) (the number of sentences) instead of by the number of target
    tokens: the loss the run reports is a sentence's summed loss, some 20 characters' worth, while the
    validation loss is still per token; and the gradient is about 20 times larger, so it is clipped at
    every step: AdamW sees gradients of norm 1 whatever the batch, and early on, when the true gradient
    is large and informative, its moments are filled with clipped ones."""
    def train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
        n_tok = rt.mean(torch.tensor(float(sum(len(b[2]) for b in micro_batches))).to(rt.device))   # BUG: sum((b[2] != pad_id).sum() ...)
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            src, tgt_in, tgt_out = rt.to_device(*batch)
            with rt.amp:
                logits = model(src, tgt_in)
            loss = train.sequence_loss(logits, tgt_out, pad_id, smoothing) / n_tok
            loss_sum += loss.detach()
            if penalty is not None and i == 0:
                loss = loss + penalty()
            rt.backward(loss)
        return train.update(model, optimizer, loss_sum, n_tok, cfg, rt)
    train.train_step = train_step


def gru_lr_decay_over_warmup_share():
    """The learner writes the decay's clock as (progress - w) / w, dividing by the warm-up's share
    instead of the decay's, 1 - w: the cosine runs from the peak to min_lr between 10% and 20% of the
    run, and the learning rate then stays at min_lr (1e-5) for the last 80% of the steps."""
    def lr_at(progress, cfg):
        peak, low, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]
        if cfg["decay"] not in ("cosine", "exp", "rsqrt"):
            raise train.ConfigError(f"decay='{cfg['decay']}' is not known: use one of cosine, exp, rsqrt")
        if cfg["decay"] == "rsqrt" and w <= 0:
            raise train.ConfigError("decay='rsqrt' needs a warm-up (lr = peak * sqrt(w / p)): set warmup_frac > 0, e.g. 0.1")
        if progress < w:
            return peak * progress / w
        if cfg["decay"] == "rsqrt":
            return peak * math.sqrt(w / progress)
        x = min(1.0, (progress - w) / max(1e-9, w))                     # BUG: max(1e-9, 1 - w)
        if cfg["decay"] == "exp":
            return peak * (low / peak) ** x
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * x))
    train.lr_at = lr_at


# --- decoding.py ----------------------------------------------------------------------

def greedy_starts_from_pad():
    """The learner starts greedy decoding from torch.zeros(B), meaning 'the start token', and forgets
    to fill it with bos_id: id 0 is <pad>. Every translation begins by feeding the decoder a <pad>,
    whose target embedding was never trained (the loss never looks at what follows a pad), instead of
    the <bos> every training sentence started with."""
    @torch.no_grad()
    def greedy(model, src, bos_id, eos_id, pad_id, max_len):
        B = src.shape[0]
        memory = model.encode(src)
        y = torch.zeros(B, dtype=torch.long, device=src.device)        # BUG: torch.full((B,), bos_id, ...)
        limits = torch.as_tensor(max_len, device=src.device).expand(B)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        scores = torch.zeros(B, device=src.device)
        cache, out = None, []
        for t in range(int(limits.max())):
            logits, cache = model.decode_step(y, memory, cache)
            logp = logits.float().log_softmax(dim=-1)
            y = logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


def val_loss_sum_overwritten():
    """The learner's evaluate() assigns each validation batch's summed loss instead of adding it,
    loss_sum = loss.item() for loss_sum + loss.item(), while the token count adds up over all batches:
    the validation loss reported is the last batch's summed loss over the tokens of the whole split, a
    fraction of the true per-token loss (and the perplexity just above 1). Training and the translations
    are untouched."""
    @torch.no_grad()
    def evaluate(model, data, batch_tokens, device="cpu", amp=None, split="validation", n_sentences=0, n_examples=3):
        was_training = model.training
        model.eval()
        sp = data.splits[split]
        loss_sum, n_tokens, gain = 0.0, 0, [0.0, 0]
        for i, idx in enumerate(decoding.make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False)):
            src, tgt_in, tgt_out = (t.to(device) for t in decoding.collate(sp, idx, data.src_tok, data.tgt_tok))
            shuffled = i == 0 and len(src) > 1
            with decoding.precision(amp):
                logits = model(src, tgt_in)
                other_logits = model(src.roll(1, 0), tgt_in) if shuffled else None
            loss = decoding.sequence_loss(logits, tgt_out, data.tgt_tok.pad_id, 0.0)
            tokens = int((tgt_out != data.tgt_tok.pad_id).sum())
            loss_sum, n_tokens = loss.item(), n_tokens + tokens      # BUG: loss_sum + loss.item()
            if shuffled:
                gain = [gain[0] + (decoding.sequence_loss(other_logits, tgt_out, data.tgt_tok.pad_id, 0.0) - loss).item(),
                        gain[1] + tokens]
        n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
        hyps = decoding.translate(model, data.src_tok, data.tgt_tok, sp.src_text[:n], device=device, amp=amp)
        scores = decoding.score(hyps, sp.tgt_text[:n])
        model.train(was_training)
        loss = loss_sum / max(n_tokens, 1)
        return {"loss": loss, "source_gain": gain[0] / max(gain[1], 1), "ppl": math.exp(min(loss, 50)),
                "bleu": scores["bleu"], "bleu_lc": scores["bleu_lc"], "length_ratio": scores["length_ratio"],
                "chrf": scores["chrf"], "sentences": n, "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i],
                                                                       "hyp": hyps[i]} for i in range(min(n_examples, n))]}
    decoding.evaluate = evaluate
    train.evaluate = evaluate


# --- model_transformer.py -------------------------------------------------------------

def cross_kv_kept_on_module():
    """The learner keeps the cross-attention's keys and values of the encoder output on the module
    (self.memory_kv), 'computed once per sentence', instead of in the per-call decoding cache, and
    recomputes them only when the batch size changes (a guard added after a shape error on a smaller
    last batch). Nothing clears them between calls: every later translation of a batch of the same
    size reads the keys and values of the first such batch, encoded and projected by the weights the
    model had then. The toy's validations translate the same 50 sentences in one batch, so the first
    (step 100) is right and every later one decodes with the step-100 model's view of the source.
    Teacher-forced training and the validation loss never use the cache and are the clean run's."""
    def cross_attention(self, y, memory, mask, cache=None):
        q = self.split_heads(self.q_proj(y))
        kept = getattr(self, "memory_kv", None)
        if cache is not None and kept is not None and kept[0].shape[0] == y.shape[0]:   # BUG: if cache is not None and "k" in cache: k, v = cache["k"], cache["v"]
            k, v = kept
        else:
            k, v = self.project(memory, (self.k_proj, self.v_proj))
            if cache is not None:
                self.memory_kv = (k, v)
        return self.attend(q, k, v, mask)
    model_transformer.MultiHeadAttention.cross_attention = cross_attention


# --- model_rnn.py ---------------------------------------------------------------------

def gru_attention_scores_times_sqrt_h():
    """The learner scales the dot-attention scores 'as the Transformer does', but multiplies by sqrt(H)
    where the Transformer divides by sqrt(Dh) (mixing it up with the embeddings' sqrt(d_model) scale):
    the scores s_t . (W h_j) of states of size ~1 per unit, over H = 128 units, come out 11 times too
    large, the softmax is one-hot from the first step, on whichever source position the random keys
    favour, and its gradient vanishes: the attention barely learns where to look."""
    def attend(self, query, memory):
        keys = memory.keys
        scores = query @ keys.transpose(1, 2) * math.sqrt(query.shape[-1])   # BUG: query @ keys.transpose(1, 2) (Luong's dot: no scale)
        scores = scores.masked_fill(~memory.mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        if self.record_weights:
            self.recorded.append(weights.detach())
        return weights @ memory.outputs
    model_rnn.Seq2SeqRNN.attend = attend


# --- decoding.py (GRU) ----------------------------------------------------------------

def gru_bleu_on_token_ids():
    """The learner scores BLEU on the token ids rather than on the detokenized text, 'to compare exactly
    what the model produced': each hypothesis and reference is re-encoded and written as its ids,
    '5 4 9 4 7'. With the character vocabulary every space is a token too (id 4), one between every two
    digits, which the model nearly always gets right: every n-gram BLEU counts has spaces in it, so a
    4-gram of ids needs only two digits right, and the reported BLEU is far above the real one. The
    training, the validation loss and the translations are untouched."""
    def score_ids(hypotheses, references, tok):
        ids = lambda text: " ".join(str(i) for i in tok.encode(text))      # noqa: E731
        return clean_score([ids(h) for h in hypotheses], [ids(r) for r in references])

    clean_score = decoding.score

    @torch.no_grad()
    def evaluate(model, data, batch_tokens, device="cpu", amp=None, split="validation", n_sentences=0, n_examples=3):
        was_training = model.training
        model.eval()
        sp = data.splits[split]
        loss_sum, n_tokens, gain = 0.0, 0, [0.0, 0]
        for i, idx in enumerate(decoding.make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False)):
            src, tgt_in, tgt_out = (t.to(device) for t in decoding.collate(sp, idx, data.src_tok, data.tgt_tok))
            shuffled = i == 0 and len(src) > 1
            with decoding.precision(amp):
                logits = model(src, tgt_in)
                other_logits = model(src.roll(1, 0), tgt_in) if shuffled else None
            loss = decoding.sequence_loss(logits, tgt_out, data.tgt_tok.pad_id, 0.0)
            tokens = int((tgt_out != data.tgt_tok.pad_id).sum())
            loss_sum, n_tokens = loss_sum + loss.item(), n_tokens + tokens
            if shuffled:
                gain = [gain[0] + (decoding.sequence_loss(other_logits, tgt_out, data.tgt_tok.pad_id, 0.0) - loss).item(),
                        gain[1] + tokens]
        n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
        hyps = decoding.translate(model, data.src_tok, data.tgt_tok, sp.src_text[:n], device=device, amp=amp)
        scores = score_ids(hyps, sp.tgt_text[:n], data.tgt_tok)         # BUG: decoding.score(hyps, sp.tgt_text[:n])
        model.train(was_training)
        loss = loss_sum / max(n_tokens, 1)
        return {"loss": loss, "source_gain": gain[0] / max(gain[1], 1), "ppl": math.exp(min(loss, 50)),
                "bleu": scores["bleu"], "bleu_lc": scores["bleu_lc"], "length_ratio": scores["length_ratio"],
                "chrf": scores["chrf"], "sentences": n, "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i],
                                                                       "hyp": hyps[i]} for i in range(min(n_examples, n))]}
    decoding.evaluate = evaluate
    train.evaluate = evaluate


HELD_OUT_15 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("collate_source_without_eos",
     "loss 0.916 at step 300 against the clean run's 0.970 and val loss 0.506 against 0.574 (lower: the validation "
     "batches lack the <eos> too), but BLEU 6.42, 13.64 and 22.85 at steps 100, 200 and 300 against 6.24, 23.16 "
     "and 32.55; translations begin with a stray '1' and spaces: '1 5 2 3 2 8' -> '1   2 8 2 5 2', "
     "'8 0 0 9 0 1' -> '1  0 0 1 9 0' (refs '8 2 3 2 5 1', '1 0 9 0 0 8')",
     collate_source_without_eos, ()),
    ("gru_lr_decay_over_warmup_share",
     "loss stuck near 1.65 from step 75 on (1.648 at step 300 against the clean GRU's 1.094), val loss 1.429, "
     "1.425, 1.420 against 1.214, 0.858, 0.733; BLEU 0.49, 0.69, 0.67 at steps 100, 200, 300 against 2.53, 10.89, "
     "16.10, length ratio 2.21: one digit repeated to the length limit, '1 5 2 3 2 8' -> '1 1 1 1 1 1 1 1 1 1 1 1 "
     "1 1 ', '8 0 0 9 0 1' -> '8 8 8 8 8 8 8 8 8 8 8 8 8 8 '",
     gru_lr_decay_over_warmup_share, GRU),
    ("gru_train_loss_mean_per_sentence",
     "training loss reported 21.99 at step 300 against the clean GRU's 1.094 (val loss, per token, 0.932 against "
     "0.733); BLEU 0.48, 5.31, 9.64 at steps 100, 200, 300 against 2.53, 10.89, 16.10: '1 5 2 3 2 8' -> "
     "'8 2 2 2 2 2 1 1 1', '8 0 0 9 0 1' -> '1 0 0 0 0 0 0 0 8 8 8 8 8 8 '",
     gru_train_loss_mean_per_sentence, GRU),
    ("greedy_starts_from_pad",
     "loss and val loss exactly the clean run's (0.970, val 0.574 at step 300); BLEU 6.57, 8.02, 7.66 at steps "
     "100, 200, 300 against 6.24, 23.16, 32.55, length ratio 0.52 against 0.98: short translations, often a space "
     "and one digit, '1 5 2 3 2 8' -> '2 1 2 1', '8 0 0 9 0 1' -> ' 9' (refs '8 2 3 2 5 1', '1 0 9 0 0 8')",
     greedy_starts_from_pad, ()),
    ("val_loss_sum_overwritten",
     "training loss, BLEU and translations exactly the clean run's (BLEU 6.24, 23.16, 32.55), but the validation "
     "loss reported is 0.011, 0.008, 0.007 at steps 100, 200, 300 against 1.058, 0.694, 0.574: far below the "
     "training loss (0.970), a perplexity of 1.01",
     val_loss_sum_overwritten, ()),
    ("cross_kv_kept_on_module",
     "training loss and val loss exactly the clean run's (0.970, val 0.574 at step 300); BLEU 6.24 at step 100 "
     "as the clean run, then 10.24 and 12.57 at steps 200 and 300 against 23.16 and 32.55, length ratio 1.42 "
     "against 0.98: the right digits in a shuffled, too long order, '1 5 2 3 2 8' -> '8 2 2 5 2 1 2 2 1', "
     "'8 0 0 9 0 1' -> '0 8 0 9 0 1 0 0 0 8' (refs '8 2 3 2 5 1', '1 0 9 0 0 8')",
     cross_kv_kept_on_module, ()),
    ("gru_bleu_on_token_ids",
     "training loss, val loss and translations exactly the clean GRU's (1.094, val 0.733 at step 300; "
     "'1 5 2 3 2 8' -> '8 2 3 2 1 5 2 5 2 1 5 2 5 2 '), but the BLEU reported is 12.36, 25.18, 28.86 at steps "
     "100, 200, 300 against 2.53, 10.89, 16.10: far above what such translations, a digit or two right and "
     "then repeats to the length limit, can score",
     gru_bleu_on_token_ids, GRU),
    ("gru_attention_scores_times_sqrt_h",
     "loss 1.303 at step 300 against the clean GRU's 1.094, val loss 1.214, 1.056, 0.987 against 1.214, "
     "0.858, 0.733; BLEU 1.16, 4.90, 5.85 at steps 100, 200, 300 against 2.53, 10.89, 16.10: the first digit "
     "right, then a few source digits in a loop, '1 5 2 3 2 8' -> '8 2 5 1 2 5 1 5 2 1 5 1 2 1 ', "
     "'8 0 0 9 0 1' -> '1 0 0 0 0 0 0 0 0 0 0 0 0 0 '",
     gru_attention_scores_times_sqrt_h, GRU),
]
# the clean runs: Transformer final training loss 0.970 (val loss 0.574), BLEU 6.24, 23.16, 32.55 at steps 100, 200,
# 300; GRU: final training loss 1.094 (val loss 0.733), BLEU 2.53, 10.89, 16.10.
# Tried and dropped: (BLEU at step 300 against the clean 32.55, or 16.10 for the GRU) the targets left-padded in
# collate, <bos> after the padding (37.04: harmless); the GRU's embedding tables initialised with std E ** 0.5 for
# E ** -0.5 (GRU 47.87: better); make_batches keeping np.lexsort's positions as sentence indices, unsorted batches
# (53.04: better); the GRU's inference batches without the source <eos> (GRU 13.61) and greedy decoding from <pad>
# on the GRU (GRU 13.12), both only a little below the clean run (the second kept for the Transformer); the GRU
# readout given [context; context] (GRU 14.40); the schedule bug on the Transformer (BLEU 3.43: harmful, kept for
# the GRU only, one entry per mistake). Only 5 bugs: no others were found and tested in the time.
# Tried and dropped (second pass): greedy() with a mutable default argument, out=[], collecting the steps of
# every call in one list (GRU: crashed at the first validation, torch.stack of steps of batch sizes 2 and 50,
# the checks before step 1 decode 2 sentences). Left out unrun as too near taken ones: the GRU summary from
# out[:, -1], the padded last column (gru_summary_from_first_output, gru_summary_mean_of_outputs); the GRU's
# attention queried with the decoder's initial state (gru_attention_query_final_state); the encoder layer's
# self-attention result not assigned (decoder_self_attention_dropped); AdamW's eps given the weight decay
# positionally (adam_eps_too_large). Only 4 new bugs: no fifth was found and tested in the time.
