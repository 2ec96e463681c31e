"""
Held-out set 4 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after set 3 and the checks it led to.
Each is put in from outside (monkeypatching, only in the process that runs train.main); the line
with the learner's mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,embeddings_not_scaled     # any names of HELD_OUT_4
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
import data  # noqa: E402
import decoding  # noqa: E402
import loss  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402


# --- model_transformer.py ----------------------------------------------------------------

def embeddings_not_scaled():
    """Transformer.embed adds the positions to the raw embeddings, without the sqrt(D) scale: the token
    vectors (std D^-1/2 at init) are ~6x smaller than the sinusoids they are added to, the model
    hardly sees which token is where."""
    def embed(self, table, ids, start=0):
        x = table(ids)                                           # BUG: * math.sqrt(self.cfg.d_model) missing
        return self.embed_dropout(x + self.positions[start:start + ids.shape[1]])
    model_transformer.Transformer.embed = embed


# --- decoding.py ---------------------------------------------------------------------------

def greedy_input_not_fed_back():
    """greedy keeps each step's argmax in a new variable and never feeds it back: every step's input is
    <bos>, the decoder never sees what it has written (teacher-forced training and loss are unharmed)."""
    @torch.no_grad()
    def greedy(model, src, bos_id, eos_id, pad_id, max_len):
        B = src.shape[0]
        memory = model.encode(src)
        y = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
        limits = torch.as_tensor(max_len, device=src.device).expand(B)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        scores = torch.zeros(B, device=src.device)
        cache, out = None, []
        for t in range(int(limits.max())):
            logits, cache = model.decode_step(y, memory, cache)
            logp = logits.float().log_softmax(dim=-1)
            token = logp.argmax(dim=-1)                          # BUG: y (the next input) is never set to it
            scores += logp.gather(1, token[:, None])[:, 0].masked_fill(done, 0.0)
            token = token.masked_fill(done, pad_id)
            out.append(token)
            done |= (token == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


def bleu_against_sources():
    """evaluate scores the translations against the source sentences instead of the references: good
    translations get a low BLEU (the examples it logs, against the references, look right)."""
    @torch.no_grad()
    def evaluate(model, data, batch_tokens, device="cpu", amp=None, split="validation", n_sentences=0, n_examples=3):
        was_training = model.training
        model.eval()
        sp = data.splits[split]
        loss_sum, n_tokens, gain = 0.0, 0, [0.0, 0]
        for i, idx in enumerate(decoding.make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False)):
            src, tgt_in, tgt_out = (t.to(device) for t in decoding.collate(sp, idx, data.src_tok, data.tgt_tok))
            shuffled = i % 4 == 0 and len(src) > 1
            with decoding.precision(amp):
                logits = model(src, tgt_in)
                other_logits = model(src.roll(1, 0), tgt_in) if shuffled else None
            batch_loss = decoding.sequence_loss(logits, tgt_out, data.tgt_tok.pad_id, 0.0)
            tokens = int((tgt_out != data.tgt_tok.pad_id).sum())
            loss_sum, n_tokens = loss_sum + batch_loss.item(), n_tokens + tokens
            if shuffled:
                other = decoding.sequence_loss(other_logits, tgt_out, data.tgt_tok.pad_id, 0.0)
                gain = [gain[0] + (other - batch_loss).item(), gain[1] + tokens]
        n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
        hyps = decoding.translate(model, data.src_tok, data.tgt_tok, sp.src_text[:n], device=device, amp=amp)
        scores = decoding.score(hyps, sp.src_text[:n])          # BUG: the references are sp.tgt_text[:n]
        model.train(was_training)
        mean = loss_sum / max(n_tokens, 1)
        return {"loss": mean, "source_gain": gain[0] / max(gain[1], 1), "ppl": math.exp(min(mean, 50)),
                "bleu": scores["bleu"], "bleu_lc": scores["bleu_lc"], "length_ratio": scores["length_ratio"],
                "chrf": scores["chrf"], "sentences": n,
                "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i], "hyp": hyps[i]}
                             for i in range(min(n_examples, n))]}
    decoding.evaluate = train.evaluate = evaluate


# --- batching.py ---------------------------------------------------------------------------

def tgt_in_by_roll():
    """collate makes tgt_in by rolling tgt_out one step to the right: the first input is the row's last
    entry (a pad, or <eos> for the longest sentence), never the <bos> that decoding starts from."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
        tgt_in = np.roll(tgt_out, 1, axis=1)                     # BUG: tgt_in[:, 0] must be <bos>
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = decoding.collate = collate


# --- data.py -------------------------------------------------------------------------------

def target_ids_from_source_text():
    """build_data tokenizes the source text for both sides (copy-paste): the model learns to copy its
    input (a low loss), while the references it is scored against are the real targets. A learner who
    edits data.py bumps CACHE_VERSION, as its comment asks, so the clean cached splits are not reused."""
    def build_data(cfg, log=print, tokenizers=None):
        raw, bad_rows = data.load_raw_pairs(cfg)
        report = {split: {"loaded": len(p), "bad_rows": bad_rows.get(split, 0)} for split, p in raw.items()}
        for split in raw:
            raw[split], report[split]["empty"] = data.drop_empty(raw[split])
        raw["train"], huge = data.drop_huge(raw["train"], cfg.max_len)
        train_src, train_tgt = [s for s, _ in raw["train"]], [t for _, t in raw["train"]]
        if tokenizers is not None:
            src_tok, tgt_tok = tokenizers
        elif cfg.joint_vocab:
            src_tok = tgt_tok = tokenizer.train_tokenizer(cfg.tokenizer, train_src + train_tgt, cfg.vocab_size)
        else:
            src_tok = tokenizer.train_tokenizer(cfg.tokenizer, train_src, cfg.vocab_size)
            tgt_tok = tokenizer.train_tokenizer(cfg.tokenizer, train_tgt, cfg.vocab_size)
        splits = {}
        for split, pairs in raw.items():
            src_text, tgt_text = [s for s, _ in pairs], [t for _, t in pairs]
            src_ids, tgt_ids = src_tok.encode_batch(src_text), tgt_tok.encode_batch(src_text)   # BUG: (tgt_text)
            counts = {"too_long": 0, "truncated": 0, "bad_ratio": 0}
            if split == "train":
                keep, counts = data.filter_lengths(src_ids, tgt_ids, cfg.max_len, cfg.too_long, cfg.max_len_ratio)
                counts["too_long"] += huge
                src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
                src_text, tgt_text = [src_text[i] for i in keep], [tgt_text[i] for i in keep]
            report[split].update(counts, kept=len(src_ids))
            splits[split] = data.Split(src_ids, tgt_ids, src_text, tgt_text)
        return data.Data(src_tok, tgt_tok, splits, report)
    data.build_data = build_data
    data.CACHE_VERSION = "4-target-ids-from-source"


# --- loss.py -------------------------------------------------------------------------------

def smoothed_ce_scatter_overwrites():
    """SmoothedCrossEntropy.backward writes -(1 - eps) at the true token with scatter_ instead of adding
    it to p - eps/V with scatter_add_: the true logit's gradient is a constant -(1 - eps) whatever its
    probability, the gradient no longer sums to 0 over the vocabulary, it is not the loss's gradient."""
    @staticmethod
    @loss.once_differentiable
    def backward(ctx, grad_out):
        p, t, keep = ctx.saved_tensors
        eps, V = ctx.eps, p.shape[-1]
        grad = p - eps / V
        grad.scatter_(1, t, grad.new_full(t.shape, -(1 - eps)))   # BUG: scatter_add_
        grad.mul_((grad_out * keep)[:, None])
        return grad.to(ctx.dtype), None, None, None
    loss.SmoothedCrossEntropy.backward = backward


# --- train.py ------------------------------------------------------------------------------

def run_progress_min_of_limits():
    """run_progress takes the least advanced of the limits ("whichever comes first"): the limits that
    are not set count as progress 0, so the progress, and with it the learning rate, stays at 0."""
    def run_progress(step, epochs, time_progress, cfg):
        parts = [step / cfg["max_iters"] if cfg["max_iters"] else 0.0,
                 epochs / cfg["max_epochs"] if cfg["max_epochs"] else 0.0,
                 time_progress if cfg["max_minutes"] else 0.0]
        return min(1.0, min(parts))                              # BUG: max(parts), the furthest
    train.run_progress = run_progress


# --- model_rnn.py --------------------------------------------------------------------------

def gru_attention_query_final_state():
    """Seq2SeqRNN.run_decoder (dot attention) queries the encoder once, with the decoder's final hidden
    state, for every target step: in training every step gets the context chosen by a state that has
    read the whole target (a leak); in translation, one step at a time, the query is the step's own."""
    real = model_rnn.Seq2SeqRNN.run_decoder

    def run_decoder(self, emb, memory, hidden):
        if self.cfg.attention != "dot":
            return real(self, emb, memory, hidden)
        states, h_n = self.decoder(emb, hidden.transpose(0, 1).contiguous())
        query = h_n[-1][:, None]                                 # BUG: the queries are `states`, one per step
        context = self.attend(query, memory).expand(-1, states.shape[1], -1)
        return self.readout(states, context), h_n.transpose(0, 1)
    model_rnn.Seq2SeqRNN.run_decoder = run_decoder


def gru_attention_no_softmax():
    """Seq2SeqRNN.attend uses the raw dot-product scores as weights (padding zeroed) without the softmax:
    the context is an unnormalised sum whose size follows the scores and the sentence length."""
    def attend(self, query, memory):
        scores = query @ memory.keys.transpose(1, 2)             # (B, T, S)
        weights = scores.masked_fill(~memory.mask[:, None, :], 0.0)   # BUG: -inf, then .softmax(dim=-1)
        return weights @ memory.outputs
    model_rnn.Seq2SeqRNN.attend = attend


def gru_decode_step_queries_previous_state():
    """Seq2SeqRNN.decode_step, written out by hand for one step, attends with the hidden state it was
    given, before the GRU reads the token (Bahdanau's habit), while training (run_decoder, Luong)
    attends with the state after it: in translation every step gets the context of the step before."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]          # (B, L, H)
        context = self.attend(hidden[:, -1:], memory)                     # BUG: attend with `states`, after the GRU
        states, h_n = self.decoder(self.embed(self.tgt_embed, y[:, None]), hidden.transpose(0, 1).contiguous())
        return self.readout(states, context)[:, 0], {"hidden": h_n.transpose(0, 1)}
    model_rnn.Seq2SeqRNN.decode_step = decode_step


# -----------------------------------------------------------------------------

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (seed 1337): Transformer final training loss 0.971, best BLEU 32.44 (53.70 at seed 1338);
# GRU 1.107, BLEU 17.12 (24.29 at seed 1338)
HELD_OUT_4 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, in numbers, inject, knobs)
    ("embeddings_not_scaled",
     "loss 1.38 at step 300 against the clean run's 0.97 (val loss 1.06 against 0.58); BLEU 3.3 against 32.4: "
     "translations the right length but one digit repeated ('2 2 2 2 2 2' for '8 2 3 2 5 1')",
     embeddings_not_scaled, ()),
    ("greedy_input_not_fed_back",
     "loss 0.97 and val loss 0.58, the clean run's to the digit; BLEU 0.0 at every evaluation against 32.4: "
     "each translation is its first digit repeated without spaces to the length limit ('8888...8')",
     greedy_input_not_fed_back, ()),
    ("bleu_against_sources",
     "loss 0.97 and val loss 0.58, the clean run's; BLEU 13.6 against 32.4 (14.5 against 53.7 at seed 1338), "
     "while the logged translations match their references as often as the clean run's",
     bleu_against_sources, ()),
    ("tgt_in_by_roll",
     "loss 0.91 against 0.97, val loss 0.56 against 0.58 (slightly better); BLEU 8.6 (falling to 7.5 at step "
     "300) against 32.4: translations start with a space and stop short ('' or ' 8 2 3 5'), length ratio 0.53",
     tgt_in_by_roll, ()),
    ("target_ids_from_source_text",
     "loss 0.64 against 0.97, val loss 0.17 against 0.58 (far better); BLEU 17.4 against 32.4 (14.7 against "
     "53.7 at seed 1338): the translations are the source copied ('1 5 2 3 2 8' for reference '8 2 3 2 5 1')",
     target_ids_from_source_text, ()),
    ("smoothed_ce_scatter_overwrites",
     "loss falls to 1.99 at step 50, then climbs to 2.6-2.7 and ends at 2.39 against 0.97; BLEU 10.0 against "
     "32.4 (5.5 against 53.7 at seed 1338)",
     smoothed_ce_scatter_overwrites, ()),
    ("run_progress_min_of_limits",
     "loss flat at 3.06-3.14 from step 1 to 300 against 0.97 (val loss 3.12 at every evaluation); BLEU 0.15 "
     "against 32.4: translations of a digit or spaces",
     run_progress_min_of_limits, ()),
    ("gru_attention_query_final_state",
     "loss 1.08 against the clean GRU's 1.11, val loss 0.71 against 0.75 (better); BLEU 11.4 against 17.1 "
     "(8.9 against 24.3 at seed 1338): translations shorter than the clean GRU's (length ratio 1.08 against "
     "2.17), digits out of order ('1 8 8 8 0 0' for '1 0 9 0 0 8')",
     gru_attention_query_final_state, GRU),
    ("gru_attention_no_softmax",
     "loss stuck at 2.17-2.20 from step 50 to the end (2.17) against the clean GRU's 1.11, val loss 2.06 at every "
     "evaluation against 0.75; BLEU 0.0 against 17.1: every translation is spaces only (at seed 1338 the loss "
     "leaves the plateau at step 200, ends at 1.64, BLEU 0.9 against 24.3, mostly one digit repeated)",
     gru_attention_no_softmax, GRU),
    ("gru_decode_step_queries_previous_state",
     "loss 1.11 and val loss 0.75, the clean GRU's to the digit; BLEU 4.6 against 17.1 (13.4 against 24.3 at "
     "seed 1338): the first digits right, then two digits alternating ('1 0 9 0 9 0 9 0 ...')",
     gru_decode_step_queries_previous_state, GRU),
]
