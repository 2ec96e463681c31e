"""
Held-out set 13 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after the sets before it. Each is put in
from outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_13
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from sacrebleu.metrics import BLEU, CHRF  # noqa: E402

import batching  # noqa: E402
import decoding  # noqa: E402
import loss  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")


# --- model_transformer.py -------------------------------------------------------------

def positions_scaled_with_tokens():
    """The learner remembers that 'the embeddings are multiplied by sqrt(d_model)' but writes the scale
    after the positions are added, (embedding + position) * sqrt(D), instead of embedding * sqrt(D) +
    position: the sinusoids, whose entries are already of size 1, come in 5.7 times too large, while
    the token vectors (std D^-1/2, of size 1 once scaled) keep their size. Every input is dominated by
    where the token is rather than which token it is, and the model learns which digit sits where
    far more slowly."""
    def embed(self, table, ids, start=0):
        x = table(ids) + self.positions[start:start + ids.shape[1]]
        return self.embed_dropout(x * math.sqrt(self.cfg.d_model))        # BUG: table(ids) * sqrt(D) + positions
    model_transformer.Transformer.embed = embed


def cross_attention_shares_self_attention():
    """The learner's decoder layer reuses its self-attention module for the cross-attention
    (self.cross_attn = self.self_attn, 'the same attention, only the keys come from elsewhere'): one set
    of query, key, value and output projections must serve both the causal attention over the target
    prefix and the attention over the encoder's output. It runs, and trains, but the two jobs pull the
    shared weights in different directions: the decoder finds the source digit it must copy less well."""
    orig_init = model_transformer.DecoderLayer.__init__

    def __init__(self, cfg, n_self, n_cross):
        orig_init(self, cfg, n_self, n_cross)
        self.cross_attn = self.self_attn                                   # BUG: MultiHeadAttention(...) of its own
    model_transformer.DecoderLayer.__init__ = __init__


class BatchNormOverFeatures(nn.BatchNorm1d):
    """nn.BatchNorm1d on (B, L, D): it normalises dimension 1, so the features are moved there and back."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def batchnorm_instead_of_layernorm():
    """The learner, used to CNNs, normalises each sub-layer's input with BatchNorm1d over the features
    instead of LayerNorm: in training each feature is normalised with the mean and variance of the
    whole batch (every sentence, every position, the future target positions and the padding included),
    at evaluation with the running averages of those statistics. Teacher-forced training takes a hint
    from the batch statistics (its loss falls below the clean run's), while the validation loss, computed
    with the running statistics, is more than twice the clean run's and rises from one evaluation to the
    next."""
    orig_init = model_transformer.Residual.__init__

    def __init__(self, d_model, dropout, pre_norm):
        orig_init(self, d_model, dropout, pre_norm)
        self.norm = BatchNormOverFeatures(d_model)                         # BUG: nn.LayerNorm(d_model)
    model_transformer.Residual.__init__ = __init__


# --- batching.py ----------------------------------------------------------------------

def collate_eos_overwrites_last_source():
    """The learner's collate writes the source's <eos> at index len(s) - 1, 'the last position of the
    sentence', instead of len(s), the one after it: <eos> overwrites the last source token of every
    training and validation batch. In training the first digit of each reversed target is never in the
    source, so the model learns to guess it; translation (decoding.py builds its own batches) gives the
    full source, a sentence one token longer than any the model was trained on."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)], src[b, len(s) - 1] = s, src_tok.eos_id      # BUG: src[b, len(s)] = src_tok.eos_id
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = collate
    decoding.collate = collate


def gru_trains_on_validation():
    """The learner's TrainBatches, copied from the evaluation code, reads data.splits["validation"]
    where it should read data.splits["train"]: the model trains on the 500 validation sentences, over
    and over (about 30 passes in 300 steps), and is then validated on the very sentences it learnt. The
    validation loss and BLEU it reports are far better than the clean run's, and mean nothing about
    translating unseen sentences."""
    def of_epoch(self, epoch):
        if epoch != self.epoch:
            sp = self.data.splits["validation"]                            # BUG: self.data.splits["train"]
            if self.overfit:
                self.batches = batching.make_batches(sp.src_lens, sp.tgt_lens, self.batch_tokens,
                                                     shuffle=False)[:self.overfit]
            else:
                self.batches = batching.make_batches(sp.src_lens, sp.tgt_lens, self.batch_tokens, seed=self.seed,
                                                     epoch=epoch)
            self.epoch = epoch
        return self.batches

    def next(self, epoch, i):
        if i >= len(self.of_epoch(epoch)):
            epoch, i = epoch + 1, 0
        batch = batching.collate(self.data.splits["validation"], self.of_epoch(epoch)[i],   # BUG: ["train"]
                                 self.data.src_tok, self.data.tgt_tok)
        return batch, epoch, i + 1
    batching.TrainBatches.of_epoch = of_epoch
    batching.TrainBatches.next = next


# --- loss.py --------------------------------------------------------------------------

def loss_logsumexp_over_batch():
    """The learner's forward computes log-sum-exp as x.exp().sum().log() and forgets dim=-1: the sum runs
    over every row of the batch, so each row's log-partition is log sum over all N * V logits, about
    log N too large. The hand-written backward (p - q) is untouched, so training is exactly the clean
    run's, but every loss the run reports, training and validation, is some 6.5 nats too high and does
    not even fall as the model learns (it depends on the batch's size)."""
    def forward(ctx, logits, target, ignore_id, eps):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        V = x.shape[-1]
        keep = (target != ignore_id).to(x.dtype)
        t = target.clamp(0, V - 1)[:, None]
        p = x.softmax(dim=-1)
        lse = x.exp().sum().log()                                        # BUG: x.logsumexp(dim=-1), one per row
        row_loss = lse - (1 - eps) * x.gather(1, t)[:, 0] - eps / V * x.sum(dim=-1)
        ctx.save_for_backward(p, t, keep)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (row_loss * keep).sum()
    loss.SmoothedCrossEntropy.forward = staticmethod(forward)


# --- decoding.py ----------------------------------------------------------------------

def bleu_mean_of_sentence_scores():
    """The learner's score() averages sentence-level BLEU (metric.sentence_score of each hypothesis
    against its reference) instead of computing corpus BLEU: corpus BLEU pools the n-gram counts and the
    lengths of all sentences before taking the geometric mean and brevity penalty, while the mean of
    smoothed sentence scores weights every short sentence alike and is not the number anyone reports.
    Here it comes out well above the true corpus BLEU (2.4 times it at step 100)."""
    def score(hypotheses, references):
        metrics = {"bleu": BLEU(), "bleu_lc": BLEU(lowercase=True), "chrf": CHRF()}
        out = {}
        for name, metric in metrics.items():
            result = metric.corpus_score(hypotheses, [references])
            sentences = [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
            out.update({name: sum(sentences) / max(len(sentences), 1),  # BUG: result.score (corpus-level)
                        f"{name}_str": str(result), f"{name}_signature": str(metric.get_signature())})
            if name == "bleu":
                out["length_ratio"] = result.sys_len / max(result.ref_len, 1)
        return out
    decoding.score = score


def gru_val_loss_mean_of_batch_sums():
    """The learner's evaluate() takes sequence_loss for a per-batch mean (it is the SUM over the batch's
    target tokens) and averages it over the validation batches, loss_sum / n_batches, instead of dividing
    the summed loss by the number of target tokens: the validation loss and perplexity it reports are the
    summed loss of an average batch, hundreds of nats, not a per-token loss comparable with training's."""
    @torch.no_grad()
    def evaluate(model, data, batch_tokens, device="cpu", amp=None, split="validation", n_sentences=0, n_examples=3):
        was_training = model.training
        model.eval()
        sp = data.splits[split]
        loss_sum, n_batches, gain = 0.0, 0, [0.0, 0]
        for i, idx in enumerate(decoding.make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False)):
            src, tgt_in, tgt_out = (t.to(device) for t in decoding.collate(sp, idx, data.src_tok, data.tgt_tok))
            shuffled = i == 0 and len(src) > 1
            with decoding.precision(amp):
                logits = model(src, tgt_in)
                other_logits = model(src.roll(1, 0), tgt_in) if shuffled else None
            loss_ = decoding.sequence_loss(logits, tgt_out, data.tgt_tok.pad_id, 0.0)
            tokens = int((tgt_out != data.tgt_tok.pad_id).sum())
            loss_sum, n_batches = loss_sum + loss_.item(), n_batches + 1  # BUG: n_tokens + tokens
            if shuffled:
                gain = [gain[0] + (decoding.sequence_loss(other_logits, tgt_out, data.tgt_tok.pad_id, 0.0)
                                   - loss_).item(), gain[1] + tokens]
        n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
        hyps = decoding.translate(model, data.src_tok, data.tgt_tok, sp.src_text[:n], device=device, amp=amp)
        scores = decoding.score(hyps, sp.tgt_text[:n])
        model.train(was_training)
        loss_ = loss_sum / max(n_batches, 1)                              # BUG: loss_sum / max(n_tokens, 1)
        return {"loss": loss_, "source_gain": gain[0] / max(gain[1], 1), "ppl": math.exp(min(loss_, 50)),
                "bleu": scores["bleu"], "bleu_lc": scores["bleu_lc"], "length_ratio": scores["length_ratio"],
                "chrf": scores["chrf"], "sentences": n,
                "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i], "hyp": hyps[i]}
                             for i in range(min(n_examples, n))]}
    decoding.evaluate = evaluate
    train.evaluate = evaluate


# --- model_rnn.py ---------------------------------------------------------------------

def gru_decode_step_readout_swapped():
    """The learner writes the GRU's one-step decoder for translation out by hand (the GRU, then Luong
    attention, then the readout) and concatenates the readout's input as [context; state], where the
    teacher-forced run_decoder, through readout(), gives [state; context]: at translation time the
    readout's weights for the decoder state read the attention context and the other way round.
    Training and the teacher-forced validation loss are the clean run's; the translations are garbage."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        emb = self.embed(self.tgt_embed, y[:, None])                             # (B, 1, E)
        state, h_n = self.decoder(emb, hidden.transpose(0, 1).contiguous())      # (B, 1, H), (L, B, H)
        context = self.attend(state, memory)                                     # (B, 1, Hx)
        h = torch.cat([context, state], dim=-1)                                  # BUG: torch.cat([state, context], dim=-1)
        logits = self.out_proj(torch.tanh(self.dec_readout(h)))
        return logits[:, 0], {"hidden": h_n.transpose(0, 1)}
    model_rnn.Seq2SeqRNN.decode_step = decode_step


def gru_decode_step_bottom_layer_state():
    """The learner's hand-written one-step decoder takes the new decoder state from h_n[0], thinking of
    index 0 as 'the' state (as for a one-layer GRU), instead of the top layer's, h_n[-1] (the output
    that training's run_decoder attends with and reads out): at translation time the attention query
    and the readout get the first layer's state, which they never saw in training. The teacher-forced
    losses are the clean run's; the translations are runs of one character."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        emb = self.embed(self.tgt_embed, y[:, None])
        _, h_n = self.decoder(emb, hidden.transpose(0, 1).contiguous())         # (L, B, H)
        state = h_n[0][:, None]                                                 # BUG: h_n[-1][:, None] (the top layer)
        context = self.attend(state, memory)
        logits = self.out_proj(torch.tanh(self.dec_readout(torch.cat([state, context], dim=-1))))
        return logits[:, 0], {"hidden": h_n.transpose(0, 1)}
    model_rnn.Seq2SeqRNN.decode_step = decode_step


# the clean runs: Transformer final training loss 0.970 (val loss 0.574), BLEU 6.24, 23.16, 32.55 at steps 100,
# 200, 300; GRU: final training loss 1.094 (val loss 1.214, 0.858, 0.733), BLEU 2.53, 10.89, 16.10.
HELD_OUT_13 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("positions_scaled_with_tokens",
     "loss 1.161 at step 300 against the clean run's 0.970, val loss 1.275, 0.934, 0.799 against 1.058, 0.694, "
     "0.574; BLEU 2.64, 6.90, 14.79 at steps 100, 200, 300 against 6.24, 23.16, 32.55, length ratio 1.00: "
     "'1 5 2 3 2 8' -> '8 8 2 2 2 1', '8 0 0 9 0 1' -> '1 0 0 0 8 8', '9 7 4 8' -> '8 4 7 7'",
     positions_scaled_with_tokens, ()),
    ("cross_attention_shares_self_attention",
     "loss 1.048 at step 300 against the clean run's 0.970, val loss 1.051, 0.763, 0.651 against 1.058, 0.694, "
     "0.574; BLEU 3.97, 19.45, 21.25 at steps 100, 200, 300 against 6.24, 23.16, 32.55: '1 5 2 3 2 8' -> "
     "'8 2 2 8 2 5 1', '8 0 0 9 0 1' -> '0 1 0 9 0 9', '9 7 4 8' -> '8 4 7 9'",
     cross_attention_shares_self_attention, ()),
    ("batchnorm_instead_of_layernorm",
     "training loss 0.665 at step 300, below the clean run's 0.970, while the val loss rises, 1.097, 1.313, 1.387 "
     "at steps 100, 200, 300 against the clean 1.058, 0.694, 0.574; BLEU 15.63, 37.15, 44.05 against 6.24, 23.16, "
     "32.55, length ratio 1.15 against 0.98, the translations padded with extra digits: '1 5 2 3 2 8' -> "
     "'8 8 2 3 2 3 5 1 5', '8 0 0 9 0 1' -> '1 1 1 0 9 0 0 0', '9 7 4 8' -> '7 8 4 8 7 4 9 7'",
     batchnorm_instead_of_layernorm, ()),
    ("collate_eos_overwrites_last_source",
     "loss 1.072 at step 300 against the clean run's 0.970, val loss 1.051, 0.806, 0.693 against 1.058, 0.694, "
     "0.574; BLEU 5.36, 16.56, 25.62 at steps 100, 200, 300 against 6.24, 23.16, 32.55, length ratio 1.09 against "
     "0.98, the first digit often wrong and a digit too many: '1 5 2 3 2 8' -> '8 8 2 2 2 5 1', '8 0 0 9 0 1' -> "
     "'1 0 1 0 0 8 0', '9 7 4 8' -> '7 8 4 9'",
     collate_eos_overwrites_last_source, ()),
    ("loss_logsumexp_over_batch",
     "training loss 7.681 at step 300 against the clean run's 0.970, val loss 7.657, 7.315, 7.220 against 1.058, "
     "0.694, 0.574 (hardly falling), while BLEU is the clean run's exactly, 6.24, 23.16, 32.55, and so are the "
     "translations: '8 0 0 9 0 1' -> '1 0 9 0 0 8', '9 7 4 8' -> '8 4 7 9'",
     loss_logsumexp_over_batch, ()),
    ("bleu_mean_of_sentence_scores",
     "losses the clean run's exactly (0.970, val loss 0.574 at step 300) and the same translations, but BLEU "
     "15.06, 30.48, 40.96 at steps 100, 200, 300 against the clean run's 6.24, 23.16, 32.55 (2.4 times it at step "
     "100), with the same length ratios (1.59, 1.09, 0.98)",
     bleu_mean_of_sentence_scores, ()),
    ("gru_trains_on_validation",
     "loss 0.895 at step 300 against the clean GRU's 1.094, val loss 1.144, 0.693, 0.500 against 1.214, 0.858, "
     "0.733; BLEU 3.76, 29.63, 55.29 at steps 100, 200, 300 against 2.53, 10.89, 16.10, length ratio 1.10 against "
     "2.17: the validation examples come out (almost) perfect, '1 5 2 3 2 8' -> '8 2 3 2 5 1', '9 7 4 8' -> "
     "'8 4 7 9'",
     gru_trains_on_validation, GRU),
    ("gru_val_loss_mean_of_batch_sums",
     "training loss the clean GRU's (1.094 at step 300) and BLEU too (2.53, 10.89, 16.10), but val loss 773.4, "
     "546.5, 467.2 at steps 100, 200, 300 against 1.214, 0.858, 0.733 (ppl overflowing to e^50)",
     gru_val_loss_mean_of_batch_sums, GRU),
    ("gru_decode_step_readout_swapped",
     "loss and val loss the clean GRU's (1.094; 1.214, 0.858, 0.733) but BLEU 0.44, 0.00, 0.00 at steps 100, 200, "
     "300 against 2.53, 10.89, 16.10, length ratio 0.14: runs of one digit without spaces or nothing at all, "
     "'1 5 2 3 2 8' -> '', '8 0 0 9 0 1' -> '4445599999999999999999999999', '9 7 4 8' -> "
     "'4499999999999999999999'",
     gru_decode_step_readout_swapped, GRU),
    ("gru_decode_step_bottom_layer_state",
     "loss and val loss the clean GRU's (1.094; 1.214, 0.858, 0.733) but BLEU 0.00 at steps 100, 200 and 300 "
     "against 2.53, 10.89, 16.10, length ratio 0.12-0.15: runs of one character to the length limit, "
     "'1 5 2 3 2 8' -> '3333321111111111111111111111', '8 0 0 9 0 1' -> '0808080800000000000000000000', "
     "'9 7 4 8' -> '4447777777777777777777'",
     gru_decode_step_bottom_layer_state, GRU),
]
# Tried and dropped: the encoder returning after its first layer (a `return` inside the loop; BLEU 40.3 against the
# clean 32.55), the learning rate's decay forgotten (constant peak after the warm-up; BLEU 55.8, GRU 31.3: better),
# gradient clipping of the two GRUs' parameters only (GRU BLEU 16.0 against 16.1), the cross-attention called with
# its query and memory arguments swapped (crashed: target and source lengths differ), gradient clipping through a
# model.parameters() generator kept from the first step (no clipping after step 1: BLEU 22.9, val loss 0.651; dropped
# as the same effect as clipping switched off), averaged sentence BLEU on the GRU (16.5 against 16.1: not clearly
# wrong there), and the source's <eos> overwriting its last token on the GRU (BLEU 0.55, val loss 1.295; kept for
# the Transformer instead).
