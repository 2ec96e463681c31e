"""
GRU encoder-decoder ("sequence to sequence"), the classic starting point of NMT:
- attention='none':     no attention: the whole sentence must fit through one vector, the final
                        encoder state (the "bottleneck"), in one of two classic designs:
    bottleneck='sutskever'  Sutskever et al. 2014: the summary only starts the decoder (through
                            the bridge); reverse_source=True reads the source backwards, as in
                            the paper, so its first words are the encoder's most recent.
    bottleneck='cho'        Cho et al. 2014: the summary also enters every decoder step and the
                            readout, so the decoder cannot forget it.
- attention='dot':      Luong et al. 2015 (global, dot score): the decoder state at step t looks
                        at every encoder state; runs over all target steps at once in training.
- attention='additive': Bahdanau et al. 2015: the previous decoder state scores every encoder
                        state, the context enters the GRU input; a step loop in training.
model_transformer.py's interface; the cache is the decoder's hidden state (batch first).
Leaves out: LSTMs, input feeding for Luong attention, coverage, scheduled-sampling schedules.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class RNNConfig:
    src_vocab: int
    tgt_vocab: int
    pad_id: int                       # padding id of the source vocabulary
    emb_dim: int = 256                # RNN: embedding width
    hidden_size: int = 512            # RNN: GRU state width
    n_enc_layer: int = 2
    n_dec_layer: int = 2
    bidirectional: bool = False       # RNN: the encoder reads the source in both directions (outputs 2 x hidden_size)
    attention: str = "none"           # RNN: 'none' (one summary vector), 'dot' (Luong), 'additive' (Bahdanau)
    bottleneck: str = "sutskever"     # RNN without attention: 'sutskever' (the summary starts the decoder), 'cho' (also every step)
    reverse_source: bool = False      # RNN: read each source sentence backwards (Sutskever et al. 2014)
    dropout: float = 0.1
    tie_output: bool = True           # output layer shares the target embedding (needs a projection to emb_dim)
    share_src_tgt: bool = False       # one embedding for source and target (joint vocabulary)
    teacher_forcing: float = 1.0      # RNN: probability of feeding the true previous token in training
    embed_scale: bool = True          # RNN: embeddings times sqrt(emb_dim) as GRU input (__init__ says why)


# the fields that are train.py knobs of their own (python train.py -h); it sets the others
KNOBS = ("emb_dim", "hidden_size", "bidirectional", "attention", "bottleneck", "reverse_source", "teacher_forcing",
         "embed_scale")


class Memory(NamedTuple):
    """What the encoder hands the decoder; every tensor batch-first (beam search reorders rows)."""
    outputs: torch.Tensor             # (B, S, Hx) encoder states, Hx = H or 2H (bidirectional); padding zeros
    keys: torch.Tensor | None         # (B, S, H) the outputs projected for attention; None without attention
    mask: torch.Tensor                # (B, S) True = a real source token
    init: torch.Tensor                # (B, L, H) the first state of each decoder layer (the bridge's output)
    summary: torch.Tensor             # (B, Hx) the final encoder state: Cho et al.'s c


def reversed_order(lengths: torch.Tensor, S: int) -> torch.Tensor:
    """Positions that reverse each row's first lengths[b] entries and leave its padding in place:
    lengths [3, 2], S 4 -> [[2, 1, 0, 3], [1, 0, 2, 3]]. Applying it twice restores the order."""
    pos = torch.arange(S, device=lengths.device)[None]                     # (1, S)
    return torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)  # (B, S)


class Seq2SeqRNN(nn.Module):
    kind = "rnn"

    def __init__(self, cfg: RNNConfig, verbose: bool = True):
        super().__init__()
        if cfg.attention not in ("none", "dot", "additive"):
            raise ValueError(f"attention='{cfg.attention}' is not known: use 'none', 'dot' or 'additive'")
        if cfg.bottleneck not in ("sutskever", "cho"):
            raise ValueError(f"bottleneck='{cfg.bottleneck}' is not known: use 'sutskever' or 'cho'")
        if cfg.share_src_tgt and cfg.src_vocab != cfg.tgt_vocab:
            raise ValueError("share_src_tgt needs one joint vocabulary (joint_vocab=True)")
        self.cfg = cfg
        H, E = cfg.hidden_size, cfg.emb_dim
        enc_out = H * (2 if cfg.bidirectional else 1)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, E)
        self.src_embed = self.tgt_embed if cfg.share_src_tgt else nn.Embedding(cfg.src_vocab, E)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.GRU(E, H, cfg.n_enc_layer, batch_first=True, bidirectional=cfg.bidirectional,
                              dropout=cfg.dropout if cfg.n_enc_layer > 1 else 0.0)
        # bridge: the final encoder state (both directions) -> the first state of every decoder layer
        self.enc_bridge = nn.Linear(enc_out, H * cfg.n_dec_layer)
        # Cho et al. 2014: the summary c is an input of every decoder step and of the readout
        self.cho = cfg.attention == "none" and cfg.bottleneck == "cho"
        dec_in = E + (enc_out if cfg.attention == "additive" or self.cho else 0)
        self.decoder = nn.GRU(dec_in, H, cfg.n_dec_layer, batch_first=True,
                              dropout=cfg.dropout if cfg.n_dec_layer > 1 else 0.0)
        if cfg.attention == "dot":
            self.dec_key_proj = nn.Linear(enc_out, H, bias=False)          # encoder states -> keys of width H
        if cfg.attention == "additive":
            self.dec_query_proj = nn.Linear(H, H, bias=False)               # W_s s_{t-1}
            self.dec_key_proj = nn.Linear(enc_out, H, bias=False)           # W_h h_j
            self.dec_score = nn.Linear(H, 1, bias=False)                    # v^T tanh(.)
        readout_in = H + (enc_out if cfg.attention != "none" or self.cho else 0)
        self.dec_readout = nn.Linear(readout_in, E)                         # [state; context] -> emb width
        self.out_proj = nn.Linear(E, cfg.tgt_vocab, bias=False)
        nn.init.normal_(self.tgt_embed.weight, std=E ** -0.5)
        if not cfg.share_src_tgt:
            nn.init.normal_(self.src_embed.weight, std=E ** -0.5)
        if cfg.tie_output:
            self.out_proj.weight = self.tgt_embed.weight
        # The embedding table is also the output layer, so it starts small (std E^-0.5: logits of unit
        # variance); as GRU input such vectors barely move the state, and without attention every
        # sentence started the decoder from nearly the same state (docs/results.md). Scaled by sqrt(E)
        # on the way in, as in the Transformer, the GRUs get inputs of unit variance.
        self.emb_mult = E ** 0.5 if cfg.embed_scale else 1.0
        self.record_weights = False
        self.recorded: list[torch.Tensor] = []                              # (B, t, S) attention weights per call
        if verbose:
            n_params = sum(p.numel() for p in self.parameters())
            print(f"Seq2SeqRNN ({cfg.attention} attention): {n_params / 1e6:.2f}M parameters")

    def embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> GRU inputs (B, T, E), scaled up from the output layer's size (see __init__)."""
        return table(ids) * self.emb_mult

    # --- encoder ---------------------------------------------------------------------------
    def encode(self, src: torch.Tensor) -> Memory:
        """src (B, S) -> Memory(outputs, keys, mask, init, summary).

        Packed sequences: the GRU stops at each sentence's last real token, so padding never
        changes the final state; padded output positions are zeros and masked in attention.
        """
        src_mask = src != self.cfg.pad_id                                   # (B, S) True = real token
        lengths = src_mask.sum(dim=1)
        if self.cfg.reverse_source:
            order = reversed_order(lengths, src.shape[1])                   # (B, S)
            src = src.gather(1, order)
        x = self.dropout(self.embed(self.src_embed, src))                   # (B, S, E)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.encoder(packed)                                     # h_n: (layers * dirs, B, H)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, Hx)
        if self.cfg.reverse_source:                                         # back to source order, so
            out = out.gather(1, order[:, :, None].expand_as(out))           # attention maps line up with src
        dirs = 2 if self.cfg.bidirectional else 1
        summary = torch.cat([h_n[-dirs + d] for d in range(dirs)], dim=-1)  # top layer, (B, Hx)
        init = torch.tanh(self.enc_bridge(summary)).view(src.shape[0], self.cfg.n_dec_layer, -1)  # (B, L, H)
        keys = self.dec_key_proj(out) if self.cfg.attention != "none" else None
        return Memory(out, keys, src_mask, init, summary)

    # --- attention -------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, memory: Memory) -> torch.Tensor:
        """query (B, T, H) -> context (B, T, Hx) as a mask-aware weighted sum of encoder outputs."""
        keys = memory.keys
        if self.cfg.attention == "dot":                                     # score = s_t . (W h_j)
            scores = query @ keys.transpose(1, 2)                           # (B, T, S)
        else:                                                               # score = v^T tanh(W_s s + W_h h_j)
            scores = self.dec_score(torch.tanh(self.dec_query_proj(query)[:, :, None] + keys[:, None])).squeeze(-1)
        scores = scores.masked_fill(~memory.mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)                                    # (B, T, S), padding gets 0
        if self.record_weights:
            self.recorded.append(weights.detach())
        return weights @ memory.outputs                                     # (B, T, Hx)

    def readout(self, states: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = states if context is None else torch.cat([states, context], dim=-1)
        return self.out_proj(self.dropout(torch.tanh(self.dec_readout(h))))  # (B, T, V)

    # --- decoder ---------------------------------------------------------------------------
    def run_decoder(self, emb: torch.Tensor, memory: Memory, hidden: torch.Tensor) -> tuple:
        """emb (B, T, E) target embeddings, hidden (B, L, H) -> (logits (B, T, V), new hidden)."""
        h0 = hidden.transpose(0, 1).contiguous()                            # GRU wants (L, B, H)
        if self.cfg.attention == "additive":      # the context depends on the previous state: step by step
            states, contexts = [], []
            for t in range(emb.shape[1]):
                contexts.append(self.attend(h0[-1][:, None], memory))      # (B, 1, Hx)
                step_out, h0 = self.decoder(torch.cat([emb[:, t:t + 1], contexts[-1]], dim=-1), h0)
                states.append(step_out)
            states, context, h_n = torch.cat(states, dim=1), torch.cat(contexts, dim=1), h0
        else:
            context = None
            if self.cho:                                # the summary c at every step
                context = memory.summary[:, None].expand(-1, emb.shape[1], -1)   # (B, T, Hx)
                emb = torch.cat([emb, context], dim=-1)
            states, h_n = self.decoder(emb, h0)                             # all steps at once: (B, T, H)
            if self.cfg.attention == "dot":
                context = self.attend(states, memory)
        return self.readout(states, context), h_n.transpose(0, 1)

    def decode(self, tgt_in: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Teacher forcing from the start: tgt_in (B, T) -> logits (B, T, V)."""
        return self.run_decoder(self.dropout(self.embed(self.tgt_embed, tgt_in)), memory, memory.init)[0]

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (B, S), tgt_in (B, T) -> logits (B, T, V). With teacher_forcing < 1 (training only),
        each step feeds the model's own previous prediction with probability 1 - teacher_forcing."""
        memory = self.encode(src)
        if not self.training or self.cfg.teacher_forcing >= 1.0:
            return self.decode(tgt_in, memory)
        hidden, y, logits = memory.init, tgt_in[:, 0], []
        for t in range(tgt_in.shape[1]):
            step_logits, hidden = self.run_decoder(self.dropout(self.embed(self.tgt_embed, y[:, None])), memory, hidden)
            logits.append(step_logits)
            if t + 1 < tgt_in.shape[1]:
                # torch's generator, not Python's random: train.py seeds it at every step, so resume stays exact
                use_truth = torch.rand(()).item() < self.cfg.teacher_forcing
                y = tgt_in[:, t + 1] if use_truth else step_logits[:, 0].argmax(-1)
        return torch.cat(logits, dim=1)

    def decode_step(self, y: torch.Tensor, memory: Memory, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """y (B,) previous token -> logits (B, V); the cache is {'hidden': (B, L, H)}."""
        hidden = memory.init if cache is None else cache["hidden"]
        logits, hidden = self.run_decoder(self.embed(self.tgt_embed, y[:, None]), memory, hidden)
        return logits[:, 0], {"hidden": hidden}

    @torch.no_grad()
    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's attention over the source while reading tgt_in: {'attention': (B, T, S)};
        empty without attention."""
        self.record_weights, self.recorded = True, []
        try:
            self(src, tgt_in)
        finally:
            self.record_weights = False
        return {"attention": torch.cat(self.recorded, dim=1)} if self.recorded else {}
