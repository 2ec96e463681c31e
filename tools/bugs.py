"""
Break it on purpose: the classic seq2seq bugs, each put into one short toy run from outside (a
function, method or class of the library replaced in that run's process only: no switch in the
library), and the diagnostic in train.py's log that names it. Each run is a process of its own,
one after the other; the gallery ends with one table (the bug, what a learner would see, the
warning that named it quoted from the log, the seconds) and a figure of the runs side by side
(tools/runs.py). It exits with 1 when a bug goes unnamed or the clean run is flagged.

    python tools/bugs.py                                  # all 154 runs, ~30 minutes on a 2-core CPU
    python tools/bugs.py --bugs=clean,no_causal_mask --out_dir=out/bugs --figure=docs/bugs.png

Fifteen sets: GALLERY, the bugs the diagnostics were first written for (and two clean runs), and
HELD_OUT to HELD_OUT_15 (the last thirteen in tools/held_out_3.py to _15.py), bugs
written apart from the diagnostics, after them, by someone who had not read them: how well the
checks generalise (docs/debugging.md). Leaves out: bugs of beam search, of several processes.
"""

import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                     # tools/runs.py
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batching  # noqa: E402
import data as data_module  # noqa: E402
import decoding  # noqa: E402
import loss as loss_module  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from model_rnn import Seq2SeqRNN  # noqa: E402
from model_transformer import MultiHeadAttention, Residual, Transformer  # noqa: E402
from runs import plot_runs, read_run  # noqa: E402

import held_out_3  # noqa: E402
import held_out_4  # noqa: E402
import held_out_5  # noqa: E402
import held_out_6  # noqa: E402
import held_out_7  # noqa: E402
import held_out_8  # noqa: E402
import held_out_9  # noqa: E402
import held_out_10  # noqa: E402
import held_out_11  # noqa: E402
import held_out_12  # noqa: E402
import held_out_13  # noqa: E402
import held_out_14  # noqa: E402
import held_out_15  # noqa: E402

bugs = ""  # the runs to make, comma-separated names (default: all, the clean one first); -h lists them
out_dir = "out/bugs"  # one run folder per bug in here, its printed log beside it (NAME.txt), and the data cache
figure = ""  # the figure of the runs side by side (default: out_dir/bugs.png)

# every run: a tiny Transformer on the toy task (tests/helpers.py's TINY), 300 steps, validation
# on 50 sentences every 100; one thread (these models gain nothing from a second one)
BASE = ["--dataset=toy:reverse", "--tokenizer=char", "--tie_embeddings=none", "--d_model=32", "--n_head=2",
        "--n_enc_layer=2", "--n_dec_layer=2", "--d_ff=64", "--dropout=0.0", "--batch_tokens=1500",
        "--learning_rate=3e-3", "--warmup_frac=0.1", "--max_iters=300", "--log_interval=25", "--eval_interval=100",
        "--eval_sentences=50", "--dtype=float32", "--plot=False", "--overwrite=True"]


# -----------------------------------------------------------------------------
# the bugs, each a function that puts it into this process (before train.main runs)

def no_causal_mask() -> None:
    """Decoder self-attention sees every position, the future too."""
    real = MultiHeadAttention.attend
    MultiHeadAttention.attend = lambda self, q, k, v, mask=None, causal=False: real(self, q, k, v, mask, False)


def target_not_shifted() -> None:
    """collate gives tgt_in = tgt_out: the decoder reads the word it must predict."""
    real = batching.collate

    def collate(*args, **kwargs):
        src, tgt_in, tgt_out = real(*args, **kwargs)
        return src, tgt_out.clone(), tgt_out
    batching.collate = decoding.collate = collate          # training batches and the validation loss


def loss_over_padding() -> None:
    """The loss leaves nothing out: padded target positions are predicted and averaged too."""
    real = train.sequence_loss
    train.sequence_loss = lambda logits, tgt_out, pad_id, smoothing: real(logits, tgt_out, -1, smoothing)


def softmax_before_loss() -> None:
    """The cross-entropy gets probabilities instead of logits (it takes a softmax of its own)."""
    real = train.sequence_loss
    train.sequence_loss = lambda logits, tgt_out, pad_id, smoothing: real(logits.softmax(-1), tgt_out, pad_id,
                                                                          smoothing)


def no_padding_mask() -> None:
    """The encoder's padding mask is missing: attention reads the padding after each source sentence."""
    def encode(self, src):
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, None)
        return self.enc_norm(x), None                     # cross-attention gets no mask either
    Transformer.encode = encode


def no_zero_grad() -> None:
    """optimizer.zero_grad() forgotten: each backward() adds to the gradients of every earlier step."""
    torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: None


def init_too_large() -> None:
    """Every weight initialised 10x too large."""
    real = Transformer._init_weights

    def init(self, module):
        real(self, module)
        for p in module.parameters(recurse=False):
            p.data.mul_(10)
    Transformer._init_weights = init


def eval_forgotten() -> None:
    """Decoding and validation forget model.eval(): dropout stays on while translating."""
    def forgetful(fn):
        def wrapped(model, *args, **kwargs):
            outermost = "eval" not in vars(model)         # evaluate calls translate_nbest: shadow once
            if outermost:
                model.eval = lambda: model                # this call's model.eval() does nothing
            try:
                return fn(model, *args, **kwargs)
            finally:
                if outermost:
                    del model.eval
        return wrapped
    decoding.translate_nbest = forgetful(decoding.translate_nbest)
    decoding.evaluate = train.evaluate = forgetful(decoding.evaluate)


def no_attention_scale() -> None:
    """Attention scores Q K^T without the 1 / sqrt(Dh)."""
    real = MultiHeadAttention.attend
    MultiHeadAttention.attend = lambda self, q, k, v, mask=None, causal=False: real(
        self, q * math.sqrt(q.shape[-1]), k, v, mask, causal)    # attend divides by sqrt(Dh): net, no scale


def overfit_reshuffled() -> None:
    """Overfit mode's batch is drawn anew every epoch (shuffled) instead of being the same one."""
    def of_epoch(self, epoch):
        if epoch != self.epoch:
            sp = self.data.splits["train"]
            self.batches = batching.make_batches(sp.src_lens, sp.tgt_lens, self.batch_tokens, seed=self.seed,
                                                 epoch=epoch)[:self.overfit]
            self.epoch = epoch
        return self.batches
    batching.TrainBatches.of_epoch = of_epoch


# -----------------------------------------------------------------------------
# the held-out set: bugs written apart from the diagnostics, after them, by someone who had not read them


def merge_heads_no_transpose() -> None:
    """After attention, the heads are merged with out.reshape(B, T, H*Dh) straight from (B, H, T, Dh),
    without the transpose(1, 2) first: the merged vector of position t is made of pieces of several
    positions (and heads), so in training the decoder sees slices of later positions, and one-step
    cached decoding (T = 1) computes something else than training did."""
    def attend(self, q, k, v, mask=None, causal=False):
        B, H, T, Dh = q.shape
        impl = self.impl if self.impl != "auto" else ("math" if q.device.type == "cpu" else "sdpa")
        if impl == "sdpa" and H > 0 and not self.record_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 dropout_p=self.dropout.p if self.training else 0.0)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)
            if causal:
                future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            if self.record_weights:
                self.last_weights = weights.detach()
            out = self.dropout(weights) @ v
        return self.out_proj(out.reshape(B, T, H * Dh))                  # BUG: no .transpose(1, 2)
    MultiHeadAttention.attend = attend


def src_positions_missing() -> None:
    """The encoder embeds the source tokens (scaled by sqrt(D)) but never adds the sinusoidal
    positions; only the decoder gets them. The encoder is then blind to word order: every copy of a
    digit in the source looks the same to cross-attention."""
    def encode(self, src):
        src_mask = (src != self.cfg.pad_id)[:, None, None, :]
        x = self.embed_dropout(self.src_embed(src) * math.sqrt(self.cfg.d_model))   # BUG: + positions forgotten
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask
    Transformer.encode = encode


def decode_position_not_advanced() -> None:
    """Cached decoding never advances cache['length']: every new target token is embedded with
    position 0, whereas in training the t-th token had position t."""
    def decode(self, tgt_in, memory, cache=None):
        enc_out, src_mask = memory
        start = cache["length"] if cache is not None else 0
        y = self.embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, enc_out, src_mask, cache["layers"][i] if cache is not None else None)
        # BUG: cache["length"] = start + tgt_in.shape[1] forgotten
        return self.out_proj(self.dec_norm(y))
    Transformer.decode = decode


def layernorm_over_time() -> None:
    """The sub-layer LayerNorm is hand-written with its statistics over dim=1 (the time axis)
    instead of the last (feature) axis: each position is normalised with the mean and variance of
    the whole sequence (in the decoder, the future included), and a one-token decoding step
    normalises every vector to zero."""
    def norm(self, x):
        mu = x.mean(dim=1, keepdim=True)                                    # BUG: dim=1, not -1
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + self.norm.eps) * self.norm.weight + self.norm.bias

    def forward(self, x, sublayer):
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(self, x)))
        return norm(self, x + self.dropout(sublayer(x)))
    Residual.forward = forward


def target_shifted_twice() -> None:
    """The target is shifted twice: collate already makes tgt_out = ids + <eos> (tgt_in moved left
    by one), and the loop shifts it once more (tgt_out[:, 1:], padded): after <bos> the model is
    taught the second word, after the first word the third, so it learns to skip one token ahead."""
    real = batching.collate

    def collate(*args, **kwargs):
        src, tgt_in, tgt_out = real(*args, **kwargs)
        pad = args[3].pad_id if len(args) > 3 else kwargs["tgt_tok"].pad_id
        shifted = torch.cat([tgt_out[:, 1:], torch.full_like(tgt_out[:, :1], pad)], dim=1)   # BUG
        return src, tgt_in, shifted
    batching.collate = decoding.collate = collate


def lr_schedule_step_not_fraction() -> None:
    """The one-cycle schedule is given the raw step count where it expects the run's progress as a
    fraction in [0, 1]: after step 0 the 'progress' is already past the end, so the learning rate
    sits at min_lr (1e-5) for the whole run."""
    def run_progress(step, epochs, time_progress, cfg):
        return float(step)                                                  # BUG: not step / max_iters
    train.run_progress = run_progress


def greedy_stops_when_any_done() -> None:
    """Batched greedy decoding stops as soon as ANY sentence of the batch has produced <eos>
    (done.any() instead of done.all()): every other sentence of the batch is cut at the length of
    the shortest translation."""
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
            y = logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.any():                                                  # BUG: should be done.all()
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


# -----------------------------------------------------------------------------
# GRU encoder-decoder

def gru_hidden_not_carried() -> None:
    """GRU greedy decoding restarts every step from the encoder's initial state: decode_step takes
    memory.init each time instead of the hidden state returned by the previous step, so the decoder
    only ever sees the last token it emitted."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init                                                # BUG: cache["hidden"] ignored
        logits, hidden = self.run_decoder(self.embed(self.tgt_embed, y[:, None]), memory, hidden)
        return logits[:, 0], {"hidden": hidden}
    Seq2SeqRNN.decode_step = decode_step


def gru_attention_softmax_wrong_axis() -> None:
    """Luong attention's softmax is taken over dim=1 of the (B, T, S) scores, the decoder steps,
    instead of dim=-1, the source positions: the weights of one target step no longer sum to 1 over
    the source (they depend on the other, later, steps), and in one-step decoding every source
    position gets weight 1."""
    def attend(self, query, memory):
        keys = memory.keys
        if self.cfg.attention == "dot":
            scores = query @ keys.transpose(1, 2)
        else:
            scores = self.dec_score(torch.tanh(self.dec_query_proj(query)[:, :, None] + keys[:, None])).squeeze(-1)
        scores = scores.masked_fill(~memory.mask[:, None, :], -1e9)
        weights = scores.softmax(dim=1)                                     # BUG: dim=1, not dim=-1
        if self.record_weights:
            self.recorded.append(weights.detach())
        return weights @ memory.outputs
    Seq2SeqRNN.attend = attend


def gru_hidden_view_not_transpose() -> None:
    """The decoder's initial state (B, L, H), batch-first, is put into the GRU's (L, B, H) layout
    with .view(L, B, H) instead of .transpose(0, 1) (and back with .view(B, L, H)): the numbers
    are reinterpreted, not moved, so each sentence's decoder starts from the states of other
    sentences of the batch (and of the wrong layer)."""
    def run_decoder(self, emb, memory, hidden):
        B, L, H = hidden.shape
        h0 = hidden.contiguous().view(L, B, H)                              # BUG: not transpose(0, 1)
        if self.cfg.attention == "additive":
            states, contexts = [], []
            for t in range(emb.shape[1]):
                contexts.append(self.attend(h0[-1][:, None], memory))
                step_out, h0 = self.decoder(torch.cat([emb[:, t:t + 1], contexts[-1]], dim=-1), h0)
                states.append(step_out)
            states, context, h_n = torch.cat(states, dim=1), torch.cat(contexts, dim=1), h0
        else:
            context = None
            if self.cho:
                context = memory.summary[:, None].expand(-1, emb.shape[1], -1)
                emb = torch.cat([emb, context], dim=-1)
            states, h_n = self.decoder(emb, h0)
            if self.cfg.attention == "dot":
                context = self.attend(states, memory)
        return self.readout(states, context), h_n.contiguous().view(B, L, H)   # BUG: not transpose(0, 1)
    Seq2SeqRNN.run_decoder = run_decoder



# -----------------------------------------------------------------------------
# the second held-out set: written after the first was seen and the advice rewritten, again apart from the checks

def causal_mask_in_cross_attention() -> None:
    """The decoder's causal mask is also handed to cross-attention (as with nn.Transformer's memory_mask
    set to the target mask): a (T, S) upper-triangular mask hides source positions j > t from target
    step t, so step t reads only the first t+1 source tokens. While decoding one step at a time
    (T = 1) the same (1, S).triu(1) mask leaves every step only the first source token."""
    def cross_attention(self, y, memory, mask, cache=None):
        q = self.split_heads(self.q_proj(y))
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.project(memory, (self.k_proj, self.v_proj))
            if cache is not None:
                cache["k"], cache["v"] = k, v
        T, S = q.shape[2], k.shape[2]
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)      # BUG: causal mask on memory
        return self.attend(q, k, v, mask & ~future)
    MultiHeadAttention.cross_attention = cross_attention


def loss_time_major_flatten() -> None:
    """The loss flattens the logits time-major (logits.transpose(0, 1).reshape(-1, V), a leftover from
    a seq-first model) but the targets batch-major (tgt_out.reshape(-1)): row n of the logits, position
    (t, b), is scored against the target of another sentence at another position."""
    def sequence_loss(logits, tgt_out, pad_id, smoothing):
        V = logits.shape[-1]
        flat = logits.transpose(0, 1).reshape(-1, V)                             # BUG: (T, B) order
        return loss_module.SmoothedCrossEntropy.apply(flat, tgt_out.reshape(-1), pad_id, smoothing)
    train.sequence_loss = decoding.sequence_loss = sequence_loss


def kv_cache_not_accumulated() -> None:
    """Decoder self-attention's key/value cache stores only the new step's keys and values
    (cache['k'] = k before the concatenation is kept) instead of all the steps so far: in cached decoding
    each step attends to itself and the one step before it, never to the rest of the prefix."""
    def self_attention(self, x, mask=None, causal=False, cache=None):
        q, k, v = self.project(x, (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            new_k, new_v = k, v
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = new_k, new_v                                 # BUG: not the concatenation
            causal = False
        return self.attend(q, k, v, mask, causal)
    MultiHeadAttention.self_attention = self_attention


def train_pairs_off_by_one() -> None:
    """The training pairs are misaligned by one line from sentence 1000 on (one target line lost when
    the two sides were read and cleaned separately): from there on each source sentence is paired with
    the target of the next one. Validation is read correctly."""
    real = train.load_data

    def load_data(*args, **kwargs):
        data = real(*args, **kwargs)
        sp = data.splits["train"]
        n, cut = len(sp), 1000
        order = list(range(cut)) + list(range(cut + 1, n)) + [cut]                 # BUG: target i+1 from `cut`
        src_ids = [sp.src(i) for i in range(n)]
        tgt_ids = [sp.tgt(j) for j in order]
        tgt_text = [sp.tgt_text[j] for j in order]
        data.splits["train"] = data_module.Split(src_ids, tgt_ids, list(sp.src_text), tgt_text)
        return data
    train.load_data = load_data


def warmup_never_ends() -> None:
    """The schedule's warm-up has no end: lr = peak * progress / warmup_frac at every step (the decay
    branch is never reached), so the learning rate passes the peak at 10% of the run and keeps climbing,
    to 10x the peak at the end."""
    def lr_at(progress, cfg):
        return cfg["learning_rate"] * progress / cfg["warmup_frac"]             # BUG: no min(1, ...), no decay
    train.lr_at = lr_at


def positions_by_batch_row() -> None:
    """Positional encodings indexed along the wrong axis after a switch to batch-first tensors:
    positions[:x.size(0)] with x (B, L, D) takes one position vector per sentence of the batch (row b
    gets position b, the same at every time step), so no token knows where in its sentence it is."""
    def embed(self, table, ids, start=0):
        x = table(ids) * math.sqrt(self.cfg.d_model)
        return self.embed_dropout(x + self.positions[:ids.shape[0]][:, None, :])   # BUG: batch, not time
    Transformer.embed = embed


# -----------------------------------------------------------------------------
# GRU bugs

def gru_attention_mask_inverted() -> None:
    """Luong attention's padding mask is applied the wrong way round: masked_fill(mask, -1e9) where mask
    is True at the REAL source tokens (it should be ~mask): every real token is hidden and only padding
    can be attended to (a sentence without padding gets the same -1e9 everywhere, so uniform weights):
    the context carries nothing about where the decoder is in the source."""
    def attend(self, query, memory):
        keys = memory.keys
        if self.cfg.attention == "dot":
            scores = query @ keys.transpose(1, 2)
        else:
            scores = self.dec_score(torch.tanh(self.dec_query_proj(query)[:, :, None] + keys[:, None])).squeeze(-1)
        scores = scores.masked_fill(memory.mask[:, None, :], -1e9)                # BUG: not ~memory.mask
        weights = scores.softmax(dim=-1)
        if self.record_weights:
            self.recorded.append(weights.detach())
        return weights @ memory.outputs
    Seq2SeqRNN.attend = attend


def gru_translations_not_unsorted() -> None:
    """Translation batches the sentences sorted by length, but the outputs are returned in that sorted
    order, not put back in input order: each reference is compared with the translation of another
    sentence."""
    real = decoding.translate_nbest

    def translate_nbest(model, src_tok, tgt_tok, sentences, *args, **kwargs):
        out = real(model, src_tok, tgt_tok, sentences, *args, **kwargs)
        lengths = [len(src_tok.encode(s)) if s.strip() else 0 for s in sentences]
        order = np.argsort(lengths, kind="stable")
        return [out[i] for i in order]                                          # BUG: sorted order kept
    decoding.translate_nbest = translate_nbest


def gru_optimizer_only_the_grus() -> None:
    """The optimizer is built from the two recurrent stacks only (model.encoder.parameters() +
    model.decoder.parameters()): the embeddings, the bridge, the attention's key projection, the readout
    and the output layer get gradients but are never updated, so they stay at their random initial values."""
    def param_groups(model, cfg, lr_scale=None):
        groups = {}
        for name, p in model.named_parameters():
            if p.requires_grad and name.startswith(("encoder.", "decoder.")):    # BUG: the rest left out
                groups.setdefault(p.dim() >= 2, []).append(p)
        return [{"params": ps, "weight_decay": cfg["weight_decay"] if decays else 0.0, "lr_scale": 1.0}
                for decays, ps in groups.items()]
    train.param_groups = param_groups


def gru_decode_step_unscaled_embedding() -> None:
    """The GRU's one-step decoding looks the previous token up with self.tgt_embed(y) directly, without
    the sqrt(emb_dim) scale that training's embed() applies: at translation time the decoder's inputs
    are 8x smaller than anything it was trained on."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        logits, hidden = self.run_decoder(self.tgt_embed(y[:, None]), memory, hidden)   # BUG: no emb_mult
        return logits[:, 0], {"hidden": hidden}
    Seq2SeqRNN.decode_step = decode_step

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")


# -----------------------------------------------------------------------------

@dataclass
class Bug:
    name: str
    seen: str                           # what a learner would see
    named_by: str                       # the warning that names it ('' = none: the clean run, or a held-out
                                        # bug that nothing names)
    inject: Callable | None = None      # puts the bug into the run's process
    knobs: tuple = ()                   # train.py arguments of this run, after BASE
    held_out: bool = False              # written apart from the diagnostics, after them (HELD_OUT)


GALLERY = [
    Bug("clean", "loss falls, BLEU climbs", ""),
    Bug("clean_gru", "the GRU with dot attention: loss falls, BLEU climbs (more slowly)", "", knobs=GRU),
    Bug("no_causal_mask", "loss falls faster than clean's, greedy output one digit repeated (8 8 8 8)", "causal_mask",
        no_causal_mask),
    Bug("target_not_shifted", "loss at its floor by step 100, greedy output 8888..., BLEU 0", "teacher_forcing_leak",
        target_not_shifted),
    Bug("loss_over_padding", "nothing here (0.2% padding); with more padding, a loss lowered by easy pad targets",
        "padding_in_loss", loss_over_padding),
    Bug("softmax_before_loss", "loss stuck 0.3-0.4 nats below ln(V), gradient norm under 0.1", "loss_stuck",
        softmax_before_loss),
    Bug("no_padding_mask", "training loss as clean's, BLEU a third of it: a sentence translates differently in a batch",
        "padding_mask", no_padding_mask),
    Bug("lr_too_high", "loss stalls at ~1.5, the level of a model that ignores the source; BLEU ~0", "weights_grow",
        knobs=("--learning_rate=6e-2",)),
    Bug("gru_no_clip", "GRU: loss stalls ~1 nat below ln(V), the encoder's gradient norm 0.00, BLEU 0", "weights_grow",
        knobs=("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--embed_scale=False", "--learning_rate=1e-1",
               "--grad_clip=0")),
    Bug("no_zero_grad", "loss falls slower and stalls, BLEU ~3", "gradients_kept", no_zero_grad),
    Bug("init_too_large", "step-0 loss 205 (ln(V) = 2.7), gradient norms in the hundreds, BLEU 0", "initial_loss",
        init_too_large),
    Bug("eval_forgotten", "BLEU low and falling, translations differ from one decoding to the next",
        "dropout_in_decoding",
        eval_forgotten, ("--dropout=0.1",)),
    Bug("no_attention_scale", "trains, but slower: attention starts saturated, little gradient through it",
        "attention_scale", no_attention_scale),
    Bug("overfit_reshuffled", "overfit mode's loss does not fall near zero (0.45 at step 300)",
        "overfit_batches_change", overfit_reshuffled, ("--overfit_batches=1",)),
]
HELD_OUT = [
    Bug("merge_heads_no_transpose", "training loss falls below the clean run's (0.63 against 0.97), yet greedy "
        "output is one digit repeated (8 8 8 8) and BLEU ~2", "causal_mask", merge_heads_no_transpose),
    Bug("src_positions_missing", "loss stalls above the clean run's (1.2); translations have the right digits "
        "in a scrambled order, BLEU ~13", "no_positions", src_positions_missing),
    Bug("decode_position_not_advanced", "training and validation loss exactly the clean run's, but greedy output "
        "runs on past the end, repeating pieces of the answer; BLEU ~10", "decoding_mismatch", decode_position_not_advanced),
    Bug("layernorm_over_time", "training and validation loss far below the clean run's, but greedy output is "
        "empty; BLEU 0", "causal_mask", layernorm_over_time),
    Bug("target_shifted_twice", "loss falls as the clean run's, but greedy translations come out empty; BLEU 0",
        "target_shift", target_shifted_twice),
    Bug("lr_schedule_step_not_fraction", "loss creeps from 3.1 to 2.5 in 300 steps; every translation is one "
        "digit; BLEU 0", "lr_schedule", lr_schedule_step_not_fraction),
    Bug("greedy_stops_when_any_done", "training and validation loss exactly the clean run's, but every "
        "translation is cut after a few digits; BLEU falls to 0 as training goes on", "decoding_mismatch",
        greedy_stops_when_any_done),
    Bug("gru_hidden_not_carried", "GRU: training and validation loss exactly the clean GRU's, but greedy output "
        "is its first digit repeated (8 8 8 8); BLEU under 1", "decoding_mismatch", gru_hidden_not_carried, GRU),
    Bug("gru_attention_softmax_wrong_axis", "GRU: loss stalls at ~1.3, above the clean GRU's 1.1; greedy output "
        "empty; BLEU 0", "decoding_mismatch", gru_attention_softmax_wrong_axis, GRU),
    Bug("gru_hidden_view_not_transpose", "GRU: loss a little above the clean GRU's; translations stretch and "
        "repeat digits; BLEU half the clean GRU's", "batch_leak", gru_hidden_view_not_transpose, GRU),
]
HELD_OUT_2 = [
    Bug("causal_mask_in_cross_attention", "training loss only a little above the clean run's (1.02 against 0.97), "
        "yet BLEU ~6", "source_positions_hidden", inject=causal_mask_in_cross_attention),
    Bug("loss_time_major_flatten", "loss stalls at ~2.2, not far below ln(V); BLEU 0", "loss_definition",
        inject=loss_time_major_flatten),
    Bug("kv_cache_not_accumulated", "training and validation loss exactly the clean run's, but greedy "
        "translations are far worse; BLEU ~6", "decoding_mismatch", inject=kv_cache_not_accumulated),
    Bug("train_pairs_off_by_one", "training loss stalls at ~1.6, well above the clean run's; BLEU ~2", "misaligned_pairs",
        inject=train_pairs_off_by_one),
    Bug("warmup_never_ends", "loss ends above the clean run's (1.2 against 0.97) as the learning rate keeps "
        "rising to 10x its peak; BLEU under half the clean run's", "lr_schedule", inject=warmup_never_ends),
    Bug("positions_by_batch_row", "loss stalls above the clean run's (1.3 against 0.97); BLEU ~9", "no_positions",
        inject=positions_by_batch_row),
    Bug("gru_attention_mask_inverted", "GRU: training loss about the clean GRU's (1.09 against 1.11), "
        "yet BLEU ~10 against 17", "batch_dependence", inject=gru_attention_mask_inverted, knobs=GRU),
    Bug("gru_translations_not_unsorted", "GRU: training and validation loss exactly the clean GRU's, but "
        "BLEU under 1", "translate_mismatch", inject=gru_translations_not_unsorted, knobs=GRU),
    Bug("gru_optimizer_only_the_grus", "GRU: loss stalls at ~1.9, far above the clean GRU's 1.1; BLEU under 1",
        "not_optimized", inject=gru_optimizer_only_the_grus, knobs=GRU),
    Bug("gru_decode_step_unscaled_embedding", "GRU: training and validation loss exactly the clean GRU's, but "
        "BLEU ~7 against 17", "decoding_mismatch", inject=gru_decode_step_unscaled_embedding, knobs=GRU),
]


def held_out(entries: list[tuple], named: dict[str, str]) -> list[Bug]:
    """A held-out set's (name, seen, inject, knobs) entries as Bugs, each named by named[name]."""
    return [Bug(name, seen, named[name], inject, knobs) for name, seen, inject, knobs in entries]


# the warning that names each ('' none) after the second pass; docs/debugging.md has the first
NAMED_3 = {"residual_dropped": "target_input_ignored", "decode_cache_list_aliasing": "decoding_mismatch",
           "same_batch_every_step": "batch_repeated", "char_decode_drops_first_char": "tokenizer_round_trip",
           "smoothing_weights_swapped": "loss_definition", "zero_grad_before_step": "weights_frozen",
           "greedy_log_softmax_over_batch": "decoding_mismatch", "gru_hidden_from_output": "decoding_mismatch",
           "gru_decode_starts_from_zeros": "decoding_mismatch", "gru_embeddings_divided": "target_input_ignored"}
HELD_OUT_3 = held_out(held_out_3.HELD_OUT_3, NAMED_3)
NAMED_4 = {"embeddings_not_scaled": "embedding_scale", "greedy_input_not_fed_back": "decoding_mismatch",
           "bleu_against_sources": "scoring", "tgt_in_by_roll": "target_shift",
           "target_ids_from_source_text": "tokenizer_round_trip", "smoothed_ce_scatter_overwrites": "loss_definition",
           "run_progress_min_of_limits": "lr_schedule", "gru_attention_query_final_state": "causal_mask",
           "gru_attention_no_softmax": "attention_not_distribution",
           "gru_decode_step_queries_previous_state": "decoding_mismatch"}
HELD_OUT_4 = held_out(held_out_4.HELD_OUT_4, NAMED_4)
NAMED_5 = {"target_eos_missing": "target_shift", "split_tgt_end_inclusive": "tokenizer_round_trip",
           "translate_source_without_eos": "decoding_input", "greedy_bos_eos_swapped": "translate_mismatch",
           "lr_peak_and_min_swapped": "lr_schedule", "adam_betas_swapped": "optimizer_settings",
           "positions_frequency_sign": "position_encoding", "gru_encoder_sorted_not_restored": "batch_dependence",
           "gru_decoder_reads_source_embedding": "no_gradient", "gru_adam_l2_weight_decay": "optimizer_settings"}
HELD_OUT_5 = held_out(held_out_5.HELD_OUT_5, NAMED_5)
NAMED_6 = {"linear_weights_zero_init": "constant_init", "attention_masks_after_softmax": "attention_not_distribution",
           "translate_source_left_padded": "decoding_input", "greedy_samples_instead_of_argmax": "decoding_mismatch",
           "char_ids_without_special_offset": "tokenizer_round_trip", "gru_summary_mean_of_outputs": "batch_dependence",
           "gru_loss_skips_first_position": "step_gradient", "gru_sgd_with_adam_lr": "loss_stuck",
           "gru_length_limit_from_batch_size": "translate_mismatch", "gru_cosine_without_half_shift": "lr_schedule"}
HELD_OUT_6 = held_out(held_out_6.HELD_OUT_6, NAMED_6)
NAMED_7 = {"causal_mask_filled_with_zero": "causal_mask", "cached_causal_mask_not_offset": "decoding_mismatch",
           "sublayer_reads_unnormalised": "textbook_mismatch", "logits_scaled_by_sqrt_d": "initial_loss",
           "cleaning_deletes_spaces": "text_without_spaces",
           "step_counted_twice": "step_count", "gru_encoder_under_no_grad": "no_gradient",
           "gru_model_args_swapped": "step_gradient", "gru_source_reversed_in_collate": "batch_pairs",
           "gru_loss_gradient_sign_flipped": "loss_definition"}
HELD_OUT_7 = held_out(held_out_7.HELD_OUT_7, NAMED_7)
NAMED_8 = {"cross_attention_reads_decoder": "source_ignored", "layers_in_plain_list": "unregistered_modules",
           "tgt_in_out_unpacked_swapped": "step_gradient", "adam_eps_too_large": "optimizer_settings",
           "greedy_prefix_without_bos": "decoding_mismatch", "translate_strips_first_token": "translate_mismatch",
           "gru_char_vocab_counts_lines": "tokenizer_round_trip", "gru_loss_backward_uses_log_probs": "loss_definition",
           "gru_lr_schedule_as_factor": "lr_not_applied", "gru_translate_encodes_word_by_word": "decoding_input"}
HELD_OUT_8 = held_out(held_out_8.HELD_OUT_8, NAMED_8)
NAMED_9 = {"clip_skips_large_steps": "step_gradient", "gru_collate_target_of_wrong_row": "batch_pairs",
           "gru_summary_from_first_output": "textbook_mismatch"}
HELD_OUT_9 = held_out(held_out_9.HELD_OUT_9, NAMED_9)          # (three: its helper ran out of time)
NAMED_10 = {"tgt_in_drops_last_token": "target_shift", "loss_softmax_over_rows": "loss_definition",
            "optimizer_rebuilt_every_step": "optimizer_steps", "attention_weights_detached": "no_gradient",
            "decode_projections_all_query": "decoding_mismatch", "gru_dropout_as_keep_prob": "training_mode_blind",
            "gru_token_mean_moved_to_lr": "lr_not_applied", "gru_gate_biases_one": "target_input_ignored",
            "gru_logits_squashed_by_tanh": "textbook_mismatch", "gru_decode_step_unprojected_keys": "decoding_mismatch"}
HELD_OUT_10 = held_out(held_out_10.HELD_OUT_10, NAMED_10)
NAMED_11 = {"positions_exponent_not_divided": "textbook_mismatch", "qkv_split_interleaved": "textbook_mismatch",
            "decode_value_cache_from_keys": "decoding_mismatch", "decoder_self_attention_dropped": "no_gradient",
            "loss_grad_eps_not_divided": "loss_definition", "greedy_where_args_swapped": "decoding_mismatch",
            "gru_pack_lengths_sorted_alone": "batch_dependence",
            "gru_decode_step_runs_encoder_gru": "decoding_mismatch",
            "gru_weight_decay_divided_by_lr": "weights_shrink", "gru_optimizer_of_discarded_model": "not_optimized"}
HELD_OUT_11 = held_out(held_out_11.HELD_OUT_11, NAMED_11)
NAMED_12 = {"embeddings_default_init": "embedding_scale", "init_zeroes_every_1d_parameter": "constant_init",
            "forward_without_encoder_norm": "no_gradient", "attention_scaled_by_key_count": "textbook_mismatch",
            "clip_scales_weights": "step_gradient", "translate_pads_with_eos": "decoding_input",
            "gru_char_ids_from_sorted_chars": "tokenizer_round_trip",
            "gru_whitespace_cleaning_deletes_spaces": "text_without_spaces",
            "gru_val_loss_against_decoder_input": "validation_loss",
            "gru_reverse_source_flipped_with_padding": "batch_dependence"}
HELD_OUT_12 = held_out(held_out_12.HELD_OUT_12, NAMED_12)
NAMED_13 = {"positions_scaled_with_tokens": "textbook_mismatch",
            "cross_attention_shares_self_attention": "shared_modules",
            "batchnorm_instead_of_layernorm": "textbook_mismatch", "collate_eos_overwrites_last_source": "batch_pairs",
            "loss_logsumexp_over_batch": "loss_definition", "bleu_mean_of_sentence_scores": "scoring",
            "gru_trains_on_validation": "epoch_of_the_split", "gru_val_loss_mean_of_batch_sums": "validation_loss",
            "gru_decode_step_readout_swapped": "decoding_mismatch",
            "gru_decode_step_bottom_layer_state": "decoding_mismatch"}
HELD_OUT_13 = held_out(held_out_13.HELD_OUT_13, NAMED_13)
NAMED_14 = {"char_vocab_skips_most_frequent": "tokenizer_round_trip", "positions_frequencies_growing": "position_encoding",
            "init_gpt2_std": "init_scale", "positions_indexed_by_token_ids": "textbook_mismatch",
            "gru_decode_step_source_embedding": "decoding_mismatch", "gru_adam_betas_swapped": "optimizer_settings",
            "gru_lr_set_per_epoch": "lr_not_applied", "batch_cost_product": "batch_size",
            "gru_greedy_argmax_over_slice": "decoding_mismatch"}
HELD_OUT_14 = held_out(held_out_14.HELD_OUT_14, NAMED_14)          # (nine: its helper ran out of time)
NAMED_15 = {"collate_source_without_eos": "target_shift", "gru_lr_decay_over_warmup_share": "lr_schedule",
            "gru_train_loss_mean_per_sentence": "step_gradient", "greedy_starts_from_pad": "decoding_mismatch",
            "val_loss_sum_overwritten": "validation_loss", "cross_kv_kept_on_module": "hidden_state",
            "gru_bleu_on_token_ids": "scoring", "gru_attention_scores_times_sqrt_h": "textbook_mismatch"}
HELD_OUT_15 = held_out(held_out_15.HELD_OUT_15, NAMED_15)          # (eight, by two helpers in turn)
SETS = (HELD_OUT + HELD_OUT_2 + HELD_OUT_3 + HELD_OUT_4 + HELD_OUT_5 + HELD_OUT_6 + HELD_OUT_7 + HELD_OUT_8
        + HELD_OUT_9 + HELD_OUT_10 + HELD_OUT_11 + HELD_OUT_12 + HELD_OUT_13 + HELD_OUT_14 + HELD_OUT_15)
for bug in SETS:
    bug.held_out = True
BY_NAME = {bug.name: bug for bug in GALLERY + SETS}


# -----------------------------------------------------------------------------
# running them

def run_bug(name: str, run_dir: str, cache_dir: str, printed: str) -> None:
    """In a fresh process: put the bug in, then train.main on BASE + the bug's knobs, its log to `printed`."""
    sys.stdout = sys.stderr = open(printed, "w", buffering=1)       # line by line, a traceback too
    torch.set_num_threads(1)
    bug = BY_NAME[name]
    if bug.inject is not None:
        bug.inject()
    train.main([*BASE, *bug.knobs, f"--out_dir={run_dir}", f"--cache_dir={cache_dir}"])


def run_all(names: list[str], root: str) -> list[dict]:
    """Run each named bug in a process of its own, one after the other; their outcomes."""
    context = multiprocessing.get_context("spawn")          # a fresh interpreter: no bug leaks into the next
    outcomes = []
    for name in names:
        run_dir, printed = os.path.join(root, name), os.path.join(root, f"{name}.txt")
        started = time.time()
        process = context.Process(target=run_bug, args=(name, run_dir, os.path.join(root, "cache"), printed))
        process.start()
        process.join()
        outcomes.append(outcome(BY_NAME[name], run_dir, process.exitcode, time.time() - started))
        print(verdict_line(outcomes[-1]), flush=True)
    return outcomes


def outcome(bug: Bug, run_dir: str, exit_code: int, seconds: float) -> dict:
    """What one run showed: the warnings of its log.jsonl by name (the first of each), its last loss
    and best BLEU, whether its diagnostic named it (the clean run: whether nothing fired)."""
    path = os.path.join(run_dir, "log.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    warnings = {}
    for r in records:
        if r["kind"] == "warning":
            warnings.setdefault(r["name"], r["text"])
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    bleus = [r["bleu"] for r in records if r["kind"] == "eval"]
    named = bug.named_by in warnings if bug.named_by else (not warnings and not bug.held_out)
    return dict(bug=bug, warnings=warnings, exit_code=exit_code, seconds=seconds, named=named, run_dir=run_dir,
                loss=losses[-1] if losses else math.nan, bleu=max(bleus) if bleus else math.nan)


def verdict_line(o: dict) -> str:
    bug, fired = o["bug"], ", ".join(o["warnings"]) or "nothing"
    if bug.held_out and not bug.named_by:
        state = f"held out, named by nothing that points at it (fired: {fired})"
    elif not bug.named_by:
        state = "clean, nothing fired" if o["named"] else f"FLAGGED: {fired}"
    else:
        state = f"named by {bug.named_by}" if o["named"] else f"NOT NAMED (fired: {fired})"
    code = f", exit code {o['exit_code']}" if o["exit_code"] else ""
    return f"{bug.name:<20} {o['seconds']:5.1f} s  {state}{code}"


def quote(text: str, limit: int = 110) -> str:
    """A warning's first sentence, at most `limit` characters."""
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def table(outcomes: list[dict]) -> list[str]:
    """The gallery as a markdown table, one row per run."""
    lines = ["| bug | what a learner sees | last loss, best BLEU | named by: its log line | also fired | s |",
             "|---|---|---|---|---|---:|"]
    for o in outcomes:
        bug = o["bug"]
        if bug.held_out and not bug.named_by:
            said = "**not named**"
        elif not bug.named_by:
            said = "nothing fired" if o["named"] else "**flagged**"
        elif o["named"]:
            said = f"`{bug.named_by}`: \"warning: {quote(o['warnings'][bug.named_by])}\""
        else:
            said = f"**not named** (expected `{bug.named_by}`)"
        also = ", ".join(f"`{n}`" for n in o["warnings"] if n != bug.named_by) or "-"
        lines.append(f"| {bug.name}{' (held out)' if bug.held_out else ''} | {bug.seen} | {o['loss']:.2f}, {o['bleu']:.1f} | {said} | {also} | "
                     f"{o['seconds']:.0f} |")
    return lines


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip() + "\n\nthe bugs: " + ", ".join(BY_NAME) + "\n")
    configure(globals(), sys.argv[1:], doc_files=(__file__,))
    names = [n.strip() for n in bugs.split(",") if n.strip()] if bugs else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"--bugs names {', '.join(unknown)}, which the gallery does not have: use some of "
                          + ", ".join(BY_NAME))
    os.makedirs(out_dir, exist_ok=True)
    started = time.time()
    outcomes = run_all(names, out_dir)
    print("\n" + "\n".join(table(outcomes)) + "\n")
    picture = plot_runs([read_run(o["run_dir"], o["bug"].name) for o in outcomes
                         if os.path.exists(os.path.join(o["run_dir"], "log.jsonl"))],
                        figure or os.path.join(out_dir, "bugs.png"), title="tools/bugs.py: the gallery's runs")
    failed = [o["bug"].name for o in outcomes if not o["named"] and not (o["bug"].held_out and not o["bug"].named_by)]
    print(f"{len(outcomes)} runs in {time.time() - started:.0f} s; figure {picture}")
    if failed:
        print(f"not as expected: {', '.join(failed)} (the printed log of each: {out_dir}/NAME.txt)")
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
