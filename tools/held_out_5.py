"""
Held-out set 5 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py. Each is put in from outside
(monkeypatching, only in the process that runs train.main); the line with the learner's mistake
is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_5
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import batching  # noqa: E402
import data  # noqa: E402
import decoding  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402


# --- batching.py ----------------------------------------------------------------------

def target_eos_missing():
    """The learner's collate appends <eos> to the source but not to tgt_out: the position after the
    last target token stays pad, which the loss ignores, so the model is never taught to emit <eos>
    and greedy decoding only stops at its length limit."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
            tgt_out[b, :len(t)] = t                                    # BUG: no <eos> after the last target token
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = collate
    decoding.collate = collate


# --- data.py --------------------------------------------------------------------------

def split_tgt_end_inclusive():
    """The learner reads the flat target ids as if the offsets were inclusive ends, off[i + 1] - 1:
    every training and validation target loses its last token, so the model learns to stop one
    token early."""
    def tgt(self, i):
        return self.tgt_flat[self.tgt_off[i]:self.tgt_off[i + 1] - 1]  # BUG: the slice end is already exclusive
    data.Split.tgt = tgt


# --- decoding.py ----------------------------------------------------------------------

def translate_source_without_eos():
    """The learner's inference batching pads the source sentences but forgets the <eos> that
    collate appends in training: the model is asked to translate sources unlike any it was trained
    on, without the end marker it learnt to count from."""
    def length_sorted_batches(encoded, pad_id, eos_id, batch_size):
        order = [i for i in np.argsort([len(e) for e in encoded], kind="stable") if encoded[i]]
        batches = []
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start:start + batch_size]]
            src = torch.full((len(idx), max(len(encoded[i]) for i in idx) + 1), pad_id, dtype=torch.long)
            for b, i in enumerate(idx):
                src[b, :len(encoded[i])] = torch.tensor(encoded[i])   # BUG: no <eos> appended, unlike training
            batches.append((idx, src))
        return batches
    decoding.length_sorted_batches = length_sorted_batches


def greedy_bos_eos_swapped():
    """The learner passes <eos> and <bos> to greedy() in the wrong order: decoding starts from <eos>, a
    token the decoder never read in training, and waits for a <bos> that never comes (the loop runs
    to its length limit; the text is cut at the first <eos> the model emits after its wrong start)."""
    def translate_nbest(model, src_tok, tgt_tok, sentences, beam=1, alpha=0.6, nbest=1, batch_size=64,
                        max_src_len=256, max_len_a=1.5, max_len_b=10, device="cpu", amp=None, warn=print):
        if beam == 1 and nbest > 1:
            raise ValueError(f"nbest={nbest} needs beam search: set beam to at least {nbest}")
        was_training = model.training
        model.eval()
        encoded = []
        for i, text in enumerate(sentences):
            ids = src_tok.encode(text) if text.strip() else []
            if len(ids) > max_src_len:
                warn(f"warning: input line {i + 1} has {len(ids)} tokens; truncated to {max_src_len}")
                ids = ids[:max_src_len]
            encoded.append(ids)
        out = [[("", 0.0)] * nbest for _ in sentences]
        for idx, src in decoding.length_sorted_batches(encoded, src_tok.pad_id, src_tok.eos_id, batch_size):
            src, limit = src.to(device), [decoding.max_target_len(len(encoded[i]) + 1, max_len_a, max_len_b) for i in idx]
            with decoding.precision(amp):
                if beam == 1:
                    hyps, scores = decoding.greedy(model, src, tgt_tok.eos_id, tgt_tok.bos_id, tgt_tok.pad_id, limit)  # BUG
                    found = [[(decoding.strip_special(h, tgt_tok.eos_id), s)] for h, s in zip(hyps.tolist(), scores.tolist())]
                else:
                    found = decoding.beam_search(model, src, tgt_tok.bos_id, tgt_tok.eos_id, limit, beam, alpha, nbest)
            for b, i in enumerate(idx):
                out[i] = [(tgt_tok.decode(ids), s) for ids, s in found[b]]
        model.train(was_training)
        return out
    decoding.translate_nbest = translate_nbest


# --- train.py -------------------------------------------------------------------------

def lr_peak_and_min_swapped():
    """The learner unpacks the schedule's knobs in the wrong order, (min_lr, learning_rate): the run
    warms up to min_lr (1e-5) and the cosine then climbs to the peak instead of decaying from it,
    so it barely learns in its first steps and ends at its highest rate, with no decay to settle."""
    def lr_at(progress, cfg):
        low, peak, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]   # BUG: peak and low swapped
        if cfg["decay"] not in ("cosine", "exp", "rsqrt"):
            raise train.ConfigError(f"decay='{cfg['decay']}' is not known: use one of cosine, exp, rsqrt")
        if cfg["decay"] == "rsqrt" and w <= 0:
            raise train.ConfigError("decay='rsqrt' needs a warm-up (lr = peak * sqrt(w / p)): set warmup_frac > 0, e.g. 0.1")
        if progress < w:
            return peak * progress / w
        if cfg["decay"] == "rsqrt":
            return peak * math.sqrt(w / progress)
        x = min(1.0, (progress - w) / max(1e-9, 1 - w))
        if cfg["decay"] == "exp":
            return peak * (low / peak) ** x
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * x))
    train.lr_at = lr_at


def adam_betas_swapped():
    """The learner writes AdamW's betas as (0.98, 0.9): the first moment (momentum) averages over ~50
    steps and the second over ~10, so the step size follows the last few gradients' squares while the
    direction lags far behind them."""
    def make_optimizer(model, cfg, lr_scale=None):
        return torch.optim.AdamW(train.param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"],
                                 betas=(0.98, 0.9), fused=True)                 # BUG: (beta1, beta2) = (0.9, 0.98)
    train.make_optimizer = make_optimizer


def gru_adam_l2_weight_decay():
    """The learner builds torch.optim.Adam with weight_decay instead of AdamW: the decay is added to the
    gradient (L2) and then divided by Adam's running gradient scale, so on parameters with small
    gradients it dominates the update and drags the weights to zero instead of decaying them gently."""
    def make_optimizer(model, cfg, lr_scale=None):
        return torch.optim.Adam(train.param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"],
                                betas=(0.9, 0.98), fused=True)                  # BUG: Adam, not AdamW
    train.make_optimizer = make_optimizer


# --- model_transformer.py -------------------------------------------------------------

def positions_frequency_sign():
    """The learner drops the minus sign of the sinusoid's exponent: the frequencies grow as
    10000^(2i/D) instead of shrinking, every dimension turns many times per position, and the
    position codes are unrelated pseudo-random vectors with no notion of nearness."""
    def sinusoidal_positions(n, d):
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (math.log(10000.0) / d))  # BUG: + exponent
        table = torch.zeros(n, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        return table
    model_transformer.sinusoidal_positions = sinusoidal_positions


# --- model_rnn.py ---------------------------------------------------------------------

def gru_encoder_sorted_not_restored():
    """The learner sorts the batch by source length for pack_padded_sequence (enforce_sorted) and never
    puts the encoder's outputs and final states back in batch order: each target sentence is decoded
    from, and attends to, another sentence's encoding."""
    def encode(self, src):
        src_mask = src != self.cfg.pad_id
        lengths = src_mask.sum(dim=1)
        if self.cfg.reverse_source:
            order = model_rnn.reversed_order(lengths, src.shape[1])
            src = src.gather(1, order)
        by_length = lengths.argsort(descending=True)                   # pack_padded_sequence: longest first
        x = self.dropout(self.embed(self.src_embed, src[by_length]))
        packed = pack_padded_sequence(x, lengths[by_length].cpu(), batch_first=True)
        out, h_n = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        # BUG: out and h_n stay in length order: never indexed with by_length.argsort()
        if self.cfg.reverse_source:
            out = out.gather(1, order[:, :, None].expand_as(out))
        dirs = 2 if self.cfg.bidirectional else 1
        summary = torch.cat([h_n[-dirs + d] for d in range(dirs)], dim=-1)
        init = torch.tanh(self.enc_bridge(summary)).view(src.shape[0], self.cfg.n_dec_layer, -1)
        keys = self.dec_key_proj(out) if self.cfg.attention != "none" else None
        return model_rnn.Memory(out, keys, src_mask, init, summary)
    model_rnn.Seq2SeqRNN.encode = encode


def gru_decoder_reads_source_embedding():
    """The learner's teacher-forced decode embeds the target tokens with the source table (copied from
    encode), while decode_step, used for translating, embeds them with the target table: the table
    the decoder is trained with is not the one it translates with, which stays untrained."""
    def decode(self, tgt_in, memory):
        return self.run_decoder(self.dropout(self.embed(self.src_embed, tgt_in)), memory, memory.init)[0]  # BUG
    model_rnn.Seq2SeqRNN.decode = decode


# -----------------------------------------------------------------------------

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (seed 1337): Transformer final training loss 0.971, best BLEU 32.44; GRU: final training loss
# 1.107 (val loss 0.753), best BLEU 17.12 (length ratio 2.17)
HELD_OUT_5 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, in numbers, inject, knobs)
    ("target_eos_missing",
     "loss 0.902 at step 300 against the clean run's 0.971 (val loss 0.502 against 0.575); BLEU 19.5 against 32.4, "
     "length ratio 2.19 against 0.98: every translation runs on to its length limit past a right start, "
     "'9 7 4 8' -> '8 4 7 9 4 7 8 9 7 9' (ref '8 4 7 9')",
     target_eos_missing, ()),
    ("split_tgt_end_inclusive",
     "loss 1.025 at step 300 against 0.971 (val loss 0.638 against 0.575); BLEU 21.9 against 32.4, length ratio "
     "0.82 against 0.98: translations lack their last token, '9 7 4 8' -> '8 4 7', '8 0 0 9 0 1' -> '1 0 0 9 0'",
     split_tgt_end_inclusive, ()),
    ("translate_source_without_eos",
     "loss and val loss the clean run's (0.971, 0.575); BLEU 28.8 against 32.4, length ratio 1.23 against 0.98 "
     "(seed 1338: BLEU 41.5 against 53.7, 1.12 against 1.00): translations run on by a token or two, "
     "'8 0 0 9 0 1' -> '1 0 9 0 0 8 0 0'",
     translate_source_without_eos, ()),
    ("greedy_bos_eos_swapped",
     "loss and val loss the clean run's (0.971, 0.575); BLEU 6.3 against 32.4, length ratio 0.67 against 0.98: "
     "translations start with a space and stop early, '9 7 4 8' -> ' 9 7', '8 0 0 9 0 1' -> '  0 9 1'",
     greedy_bos_eos_swapped, ()),
    ("lr_peak_and_min_swapped",
     "loss 3.003 at step 50 against 1.579 and 1.176 at step 300 against 0.971 (val loss 0.755 against 0.575), "
     "the logged lr 4.6e-05 at step 50 and 3.0e-03 at the end; BLEU 5.1 at step 200 against 22.3, 23.9 at the end "
     "against 32.4",
     lr_peak_and_min_swapped, ()),
    ("adam_betas_swapped",
     "loss 1.374 at step 300 against 0.971 (val loss 1.053 against 0.575); BLEU 5.2 against 32.4: translations "
     "repeat a few digits, '1 5 2 3 2 8' -> '2 2 2 2 2 3 3 1 2', '8 0 0 9 0 1' -> '0 8 0 0 0 0 0 0'",
     adam_betas_swapped, ()),
    ("positions_frequency_sign",
     "loss 1.101 at step 300 against 0.971 (val loss 0.718 against 0.575); BLEU 22.1 against 32.4 (no gain "
     "after step 200): the right digits in a wrong order, '8 0 0 9 0 1' -> '1 0 0 8 8 0'",
     positions_frequency_sign, ()),
    ("gru_encoder_sorted_not_restored",
     "loss 1.620 at step 300 against the clean GRU's 1.107, flat from step 100 (val loss 1.374 against 0.753); "
     "BLEU 1.0 against 17.1: one translation for different sources, '1 5 2 3 2 8' and '8 0 0 9 0 1' both -> "
     "'2 2 2 7 7 7 7 7 2 2 2 2 2 2'",
     gru_encoder_sorted_not_restored, GRU),
    ("gru_decoder_reads_source_embedding",
     "loss 1.146 at step 300 against the clean GRU's 1.107 (val loss 0.796 against 0.753); BLEU 0.1 against "
     "17.1, length ratio 0.17 against 2.17: one digit then spaces, '9 7 4 8' -> '8' and 21 spaces",
     gru_decoder_reads_source_embedding, GRU),
    ("gru_adam_l2_weight_decay",
     "loss 1.632 at step 300 against the clean GRU's 1.107, flat from step 100 (val loss 1.392 against 0.753); "
     "BLEU 0.4 against 17.1: the same output for every source, '9 8 7 7 7 7 7 7 7 7 7 7 7 7'",
     gru_adam_l2_weight_decay, GRU),
]
