"""
Held-out set 14 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after the earlier sets. Each is put in
from outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_14
"""

import math
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import batching  # noqa: E402
import data  # noqa: E402
import decoding  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402


# --- tokenizer.py ---------------------------------------------------------------------

def char_vocab_skips_most_frequent():
    """The learner remembers that 'ids 0-3 are reserved for <pad>, <bos>, <eos> and <unk>' and
    skips them in the ranked character list instead of in the ids: ranked[4:vocab_size] for
    ranked[:vocab_size - 4]. The four most frequent characters are left out of the vocabulary and
    encode as <unk>: with the toy's digits, the space between them and three of the ten digits, on
    both sides. The model cannot tell those digits apart, and every space it writes decodes as
    '\u2047' (<unk> stays visible), so a translation is one long 'word' for BLEU."""
    @classmethod
    def train_chars(cls, texts, vocab_size):
        counts = Counter()
        for text in texts:
            counts.update(text)
        ranked = sorted(counts, key=lambda c: (-counts[c], c))
        return cls(ranked[len(cls.SPECIALS):vocab_size])                # BUG: ranked[: max(0, vocab_size - len(cls.SPECIALS))]
    tokenizer.CharTokenizer.train = train_chars
    data.CACHE_VERSION = "held_out_14-char_vocab_skips_most_frequent"


# --- model_transformer.py -------------------------------------------------------------

def positions_frequencies_growing():
    """The learner writes the sinusoid's frequencies as exp(2i * log(10000) / d), without the minus
    sign: 10000^(2i/d) instead of 10000^(-2i/d). The first pair of dimensions still turns at 1 radian
    per position, but the others turn faster and faster, up to thousands of radians per position:
    sin and cos of them are, from one position to the next, as good as random, so no dimension but
    the first pair says how far apart two positions are, and a dot product of two position codes no
    longer falls off smoothly with their distance."""
    def sinusoidal_positions(n, d):
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (math.log(10000.0) / d))   # BUG: (-math.log(10000.0) / d)
        table = torch.zeros(n, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        return table
    model_transformer.sinusoidal_positions = sinusoidal_positions


def init_gpt2_std():
    """The learner copies GPT-2's initialisation, normal(0, 0.02) for every Linear and Embedding,
    instead of the library's (xavier_uniform_ for the Linears, std D^-1/2 for the embeddings). 0.02 is
    tuned for widths of 768 and up; at d_model = 32 xavier's std is 0.18 and D^-1/2 is 0.18, so every
    weight starts 9 times too small: the token vectors, times sqrt(D), have std 0.11 against the
    positions' 0.7, and each attention and feed-forward branch starts out almost silent."""
    def _init_weights(self, module):
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, std=0.02)                    # BUG: Embedding std D^-0.5, Linear xavier_uniform_
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    model_transformer.Transformer._init_weights = _init_weights


def positions_indexed_by_token_ids():
    """The learner looks the positions up like an embedding, self.positions[ids], instead of taking
    the first L rows, self.positions[start:start + L]: each token gets the sinusoid of its own id, a
    second, fixed embedding of the token, and no vector anywhere says where in the sentence it is."""
    def embed(self, table, ids, start=0):
        x = table(ids) * math.sqrt(self.cfg.d_model)
        return self.embed_dropout(x + self.positions[ids])              # BUG: self.positions[start:start + ids.shape[1]]
    model_transformer.Transformer.embed = embed


# --- model_rnn.py ---------------------------------------------------------------------

def gru_decode_step_source_embedding():
    """The learner writes the one-step decoder for translation with the embedding line copied from
    encode: self.embed(self.src_embed, y[:, None]) instead of self.tgt_embed. Training (decode, teacher
    forced) looks the target tokens up in the target table, and its loss is the clean run's; but at
    translation time every token fed back to the decoder is a vector of the source table, which the
    decoder GRU has never read (the two tables are separate, tie_embeddings=none)."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        logits, hidden = self.run_decoder(self.embed(self.src_embed, y[:, None]), memory, hidden)   # BUG: self.tgt_embed
        return logits[:, 0], {"hidden": hidden}
    model_rnn.Seq2SeqRNN.decode_step = decode_step


# --- train.py -------------------------------------------------------------------------

def gru_adam_betas_swapped():
    """The learner writes AdamW's betas the wrong way round, (0.98, 0.9) for (0.9, 0.98): the
    first moment (the direction) is averaged over ~50 steps and the second (the scale) over ~10.
    Each step moves along a stale direction divided by a recent scale: when the gradient has just
    shrunk, m / sqrt(v) grows far above 1 and the step overshoots."""
    def make_optimizer(model, cfg, lr_scale=None):
        return torch.optim.AdamW(train.param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"],
                                 betas=(0.98, 0.9), fused=True)         # BUG: betas=(0.9, 0.98)
    train.make_optimizer = make_optimizer


def gru_lr_set_per_epoch():
    """The learner moves the schedule to the start of each epoch, as with a per-epoch scheduler
    (scheduler.step() once an epoch): the learning rate is set only when a new epoch begins. The first
    epoch starts at progress 0, where the warm-up's rate is 0, and the 300-step run never reaches the
    second epoch (about 350 batches of 1500 tokens), so every step is taken at a learning rate of 0."""
    def loop_step(model, optimizer, batches, run, epochs, cfg, rt, penalty=None):
        lr = train.lr_at(train.run_progress(run.step, epochs, run.time_progress, cfg), cfg)
        if run.batch_in_epoch == 0:                                     # BUG: every step, not only at an epoch's start
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        torch.manual_seed(hash((cfg["seed"], rt.rank, run.step)) % 2**63)
        micro_batches = []
        for _ in range(cfg["grad_accum"]):
            batch, run.epoch, run.batch_in_epoch = batches.next(run.epoch, run.batch_in_epoch)
            micro_batches.append(batch)
        pad_id = batches.data.tgt_tok.pad_id
        return lr, micro_batches, train.train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty)
    train.loop_step = loop_step


# --- batching.py ----------------------------------------------------------------------

def batch_cost_product():
    """The learner counts a batch's padded size as n * max_src * max_tgt (the size of its
    cross-attention maps) instead of n * (max_src + max_tgt) (the tokens it holds): with the toy's
    sentences of 5 to 23 characters, a 1500-'token' budget holds 3 to 60 sentences instead of 32 to
    150, the long ones fewest; the run sees a fraction of the data, in small, noisy batches."""
    def batch_cost(n, max_src, max_tgt):
        return n * max_src * max_tgt                                    # BUG: n * (max_src + max_tgt)
    batching.batch_cost = batch_cost


# --- decoding.py ----------------------------------------------------------------------

def gru_greedy_argmax_over_slice():
    """The learner keeps greedy decoding from choosing <pad> or <bos> by taking the argmax over
    logp[:, 2:], the ids from <eos> on, and forgets that the index it returns counts from the start of
    the slice: every chosen id comes back 2 too small (the space, id 4, as <eos>, id 2; a digit as the
    digit ranked two places above it, or <unk>), and that wrong id is also fed back as the next input."""
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
            y = logp[:, eos_id:].argmax(dim=-1)                         # BUG: logp[:, eos_id:].argmax(dim=-1) + eos_id
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")

# the clean runs (given): Transformer best BLEU 32.55 (final val loss 0.575); GRU best BLEU about 16.1 (val loss 0.753).
HELD_OUT_14 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("char_vocab_skips_most_frequent",
     "val loss 1.036, 0.717 and 0.614 at steps 100, 200 and 300 (about the clean run's 0.575 at the end), yet BLEU "
     "0.00 at every evaluation against the clean 32.55, length ratio 0.14: the spaces come out as '\u2047' and some "
     "digits as well, '1 5 2 3 2 8' -> '8\u2047\u2047\u2047\u2047\u2047\u20473\u20475', '9 7 4 8' -> "
     "'4\u20478\u20477\u2047\u2047'",
     char_vocab_skips_most_frequent, ()),
    ("positions_frequencies_growing",
     "loss 1.101 at step 300, val loss 1.070, 0.832 and 0.718 at steps 100, 200 and 300 against the clean 0.575 at "
     "the end; BLEU 6.68, 21.66 and 21.15 (best 21.66) against the clean 32.55: right length, digits in the wrong "
     "places, '1 5 2 3 2 8' -> '8 2 3 5 2 5', '8 0 0 9 0 1' -> '1 0 0 8 8 0'",
     positions_frequencies_growing, ()),
    ("init_gpt2_std",
     "loss 1.516 at step 300, val loss 1.378, 1.305 and 1.250 against the clean 0.575 at the end; BLEU 0.62, 1.21 "
     "and 2.01 against the clean 32.55: every sentence gets nearly the same digits, '1 5 2 3 2 8' -> '9 5 7 7 7 2', "
     "'8 0 0 9 0 1' -> '7 5 7 7 7 2', '9 7 4 8' -> '7 7 7 7'",
     init_gpt2_std, ()),
    ("positions_indexed_by_token_ids",
     "loss 1.186 at step 300, val loss 1.022, 0.867 and 0.823 against the clean 0.575 at the end; BLEU 6.42, 17.91 "
     "and 15.03 (best 17.91) against the clean 32.55: the right digits in a jumbled order, '1 5 2 3 2 8' -> "
     "'2 5 3 2 8 1', '8 0 0 9 0 1' -> '0 0 1 0 8 9', '9 7 4 8' -> '4 8 9 7 8'",
     positions_indexed_by_token_ids, ()),
    ("gru_decode_step_source_embedding",
     "losses exactly the clean GRU's (val loss 1.214, 0.858, 0.733 at steps 100, 200, 300; loss 1.094 at 300), "
     "but BLEU 0.00 at every evaluation against the clean 16.1, length ratio 0.05: translations are runs of spaces, "
     "'1 5 2 3 2 8' -> 28 spaces, '9 7 4 8' -> '8' and spaces",
     gru_decode_step_source_embedding, GRU),
    ("gru_adam_betas_swapped",
     "loss 1.619 at step 300, val loss 1.433, 1.371 and 1.365 against the clean GRU's 0.753 at the end; BLEU 0.69, "
     "0.44 and 0.44 against the clean 16.1, length ratio 2.21: one digit repeated to the length limit, "
     "'8 0 0 9 0 1' -> '9 9 9 9 9 9 9 9 9 9 9 9 9 9 ', '1 5 2 3 2 8' -> '1 2 2 2 2 2 2 2 2 2 2 2 2 2 '",
     gru_adam_betas_swapped, GRU),
    ("gru_lr_set_per_epoch",
     "loss 2.702 at every step, val loss 2.702 at steps 100, 200 and 300 (the initial ln V guess) against the clean "
     "GRU's 0.753; BLEU 0.00 at every evaluation against 16.1, the same random string each time: '1 5 2 3 2 8' -> "
     "'5455745547554754575457545754'",
     gru_lr_set_per_epoch, GRU),
    ("batch_cost_product",
     "loss 1.299 at step 300 (runs in 6 s: small batches), val loss 1.186, 1.053 and 0.970 against the clean 0.575 at "
     "the end; BLEU 3.30, 5.83 and 6.40 against the clean 32.55: '8 0 0 9 0 1' -> '0 0 0 0 0 0 0', '9 7 4 8' -> "
     "'8 7 8 7 8'",
     batch_cost_product, ()),
    ("gru_greedy_argmax_over_slice",
     "losses exactly the clean GRU's (val loss 1.214, 0.858, 0.733), but BLEU 0.00 at every evaluation against the "
     "clean 16.1, length ratio 0.13: each translation is one character, '1 5 2 3 2 8' -> '9', '8 0 0 9 0 1' -> '5', "
     "'9 7 4 8' -> '9'",
     gru_greedy_argmax_over_slice, GRU),
]
# Tried and dropped: Adam's betas swapped on the Transformer (BLEU 5.05 against 32.55: harmful, but kept for the GRU
# as gru_adam_betas_swapped, one entry per mistake); the decoder GRU called without its initial state,
# self.decoder(emb) (not run: in one-step decoding it restarts every step from zeros, the taken
# gru_hidden_not_carried). Left out unrun as too near taken ones: heads split with view(B, H, L, Dh) without the
# transpose (merge_heads_no_transpose), the causal mask triu(2) (no_causal_mask), attention softmax over the queries
# (gru_attention_softmax_wrong_axis), greedy decoding with the cache dropped every step (gru_hidden_not_carried),
# CharTokenizer.decode without the offset (char_ids_without_special_offset). Only 9 bugs: no tenth was found and
# tested in the time.
