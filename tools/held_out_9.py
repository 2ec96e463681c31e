"""
Held-out set 9 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 8. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_9
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
import train  # noqa: E402


# --- batching.py ----------------------------------------------------------------------

def gru_collate_target_of_wrong_row():
    """The learner's collate loops `for b, i in enumerate(idx)` and reads the source of sentence i but
    the target of sentence b (the row number in the batch, not the sentence's index in the split):
    every batch pairs its sources with the first B targets of the corpus, whatever the batch holds. The
    model is taught targets that have nothing to do with its sources (and always the same few), so it
    learns to ignore the source; translation, from the real sources, writes the corpus's first targets."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S = int(split.src_lens[idx].max()) + 1
        T = int(max(split.tgt_lens[b] for b in range(B))) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(b)                           # BUG: split.tgt(i)
            src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = collate
    decoding.collate = collate


# --- train.py -------------------------------------------------------------------------

def clip_skips_large_steps():
    """The learner mixes up gradient clipping with skipping bad steps: instead of scaling the gradient
    down to grad_clip when its norm is larger, update() skips the optimizer step altogether whenever
    the norm is above grad_clip (1.0). Early in training nearly every gradient is larger than that, so
    most steps are thrown away and the model learns only from the few batches whose gradient happens to
    be small."""
    def update(model, optimizer, loss_sum, n_tok, cfg, rt):
        rt.finish_backward(model, optimizer)
        norms = train.grad_norms(model)
        loss, tokens, gnorm, gnorm_enc, gnorm_dec = torch.cat([rt.mean(loss_sum)[None], n_tok[None], norms]).tolist()
        report = dict(loss=loss, tokens=int(tokens), gnorm=gnorm, gnorm_enc=gnorm_enc, gnorm_dec=gnorm_dec)
        report["update"] = "done"
        if math.isfinite(loss) and math.isfinite(gnorm):
            if cfg["grad_clip"] <= 0 or gnorm <= cfg["grad_clip"]:       # BUG: clip_grads_with_norm_(..., grad_clip, norms[0]), then always step
                rt.step(optimizer)
        else:
            report["update"] = rt.skip(optimizer, loss)
        optimizer.zero_grad(set_to_none=True)
        return report
    train.update = update


# --- model_rnn.py ---------------------------------------------------------------------

def gru_summary_from_first_output():
    """The learner takes the encoder's summary from the batch-first outputs as out[:, 0] (thinking
    index 0 is 'the final state', as for h_n's layout) instead of the top layer's final state h_n[-1]:
    the bridge, and so every decoder layer's first state, is computed from the encoder's state after the
    FIRST source token only; the decoder starts knowing one digit of the sentence (the one it must write
    last) and nothing of the rest."""
    def encode(self, src):
        src_mask = src != self.cfg.pad_id
        lengths = src_mask.sum(dim=1)
        x = self.dropout(self.embed(self.src_embed, src))
        packed = model_rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.encoder(packed)
        out, _ = model_rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        summary = out[:, 0]                                             # BUG: h_n[-1]
        init = torch.tanh(self.enc_bridge(summary)).view(src.shape[0], self.cfg.n_dec_layer, -1)
        keys = self.dec_key_proj(out) if self.cfg.attention != "none" else None
        return model_rnn.Memory(out, keys, src_mask, init, summary)
    model_rnn.Seq2SeqRNN.encode = encode


GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs: Transformer final training loss 0.971 (val loss 0.575), BLEU 6.2, 22.3, 32.4 at steps 100, 200,
# 300; GRU: final training loss 1.107 (val loss 0.753), BLEU 2.0, 9.0, 17.1.
# Tried and dropped as about as good as the clean run: the feed-forward's ReLU forgotten (BLEU 46.7), each encoder
# layer's output discarded (34.2), decode_step without the final LayerNorm (30.4), attention's values from the key
# projection (29.8), the GRU with a huge weight decay (18.1).
HELD_OUT_9 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("clip_skips_large_steps",
     "loss 3.12-3.14 from step 100 to 300 against the clean run's 1.394 and 0.971 (val loss 3.123 at every "
     "evaluation against 1.058, 0.694, 0.575); BLEU 0.15 at steps 100, 200 and 300 against 6.2, 22.3 and 32.4, "
     "length ratio 0.20: '1 5 2 3 2 8' -> '8', '8 0 0 9 0 1' -> '9                97'",
     clip_skips_large_steps, ()),
    ("gru_collate_target_of_wrong_row",
     "loss 0.928 at step 300, below the clean GRU's 1.107, while the val loss rises, 1.462, 1.891 and 1.974 at "
     "steps 100, 200 and 300 against 1.199, 0.861 and 0.753; BLEU 1.0, 1.9 and 1.9 against 2.0, 9.0 and 17.1: "
     "every sentence gets the same translation, '1 5 2 3 2 8', '8 0 0 9 0 1' and '9 7 4 8' -> '3 8 1 2 7 9 1 0 2'",
     gru_collate_target_of_wrong_row, GRU),
    ("gru_summary_from_first_output",
     "loss 1.190 at step 300 against the clean GRU's 1.107, val loss 0.855 against 0.753; BLEU 2.3, 3.8 and 5.8 "
     "at steps 100, 200 and 300 against 2.0, 9.0 and 17.1, length ratio 2.21 against 2.17: the first digit or two "
     "right, then repeats to the length limit, '1 5 2 3 2 8' -> '8 2 2 2 2 2 5 1 5 1 5 1 1 1 ', '8 0 0 9 0 1' -> "
     "'1 0 0 0 0 0 0 0 0 0 0 0 0 0 '",
     gru_summary_from_first_output, GRU),
]
