"""
The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017), written
out so every step is visible: embeddings scaled by sqrt(D), sinusoidal positions, multi-head
attention (its q/k/v projections one stacked product), padding and causal masks, feed-forward blocks,
residuals with pre-LN (default) or post-LN (the paper's) placement, tied embeddings, and the
key/value cache that makes decoding one token at a time cheap.

The interface shared with model_rnn.py, all that train.py and decoding.py call:
    logits = model(src, tgt_in)                          # (B, T, V) teacher-forced training
    memory = model.encode(src)                           # anything whose tensors are batch-first
    logits = model.decode(tgt_in, memory)                # (B, T, V) for a given encoder memory
    logits, cache = model.decode_step(y, memory, cache)  # one target step, cache=None at start
    maps = model.attention_maps(src, tgt_in)             # {panel title: (B, T, S)} for plots
Pruning (gates.py) gates heads by a forward pre-hook on each out_proj and builds models with
fewer heads per layer (the *_heads fields), down to none. Leaves out: relative positions, mixture-of-experts, beam search (decoding.py).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    src_vocab: int
    tgt_vocab: int
    pad_id: int                       # padding id of the source vocabulary (builds the source mask)
    d_model: int = 256                # D: model width
    n_head: int = 4                   # H: heads per attention module (unless pruned)
    n_enc_layer: int = 3
    n_dec_layer: int = 3
    d_ff: int = 1024                  # feed-forward hidden width
    dropout: float = 0.1              # on embeddings and sub-layer outputs (before the residual sum)
    attn_dropout: float = 0.1         # on attention weights (fairseq's attention_dropout, default 0)
    ff_dropout: float = 0.1           # on the feed-forward hidden layer (fairseq's activation_dropout, default 0)
    pre_norm: bool = True             # LayerNorm before each sub-layer (stable); False = the paper's post-LN
    tie_output: bool = True           # target embedding doubles as the output projection
    share_src_tgt: bool = False       # source and target share one embedding (needs a joint vocabulary)
    attn_impl: str = "auto"           # 'sdpa' (F.scaled_dot_product_attention), 'math' (explicit softmax), 'auto':
                                      # math on a CPU (there SDPA's fused backward was slower), sdpa elsewhere
    # heads kept per layer after pruning (prune.py); empty = n_head everywhere
    enc_self_heads: list[int] = field(default_factory=list)
    dec_self_heads: list[int] = field(default_factory=list)
    dec_cross_heads: list[int] = field(default_factory=list)


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """(n, d) table: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(Dh)) V for H heads in parallel, then out_proj. Two uses: self-attention
    (queries, keys and values from one sequence; causal in the decoder) and cross-attention (the
    decoder's queries over the encoder's output)."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, dropout: float, impl: str = "auto"):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.q_proj = nn.Linear(d_model, n_head * head_dim)
        self.k_proj = nn.Linear(d_model, n_head * head_dim)
        self.v_proj = nn.Linear(d_model, n_head * head_dim)
        self.out_proj = nn.Linear(n_head * head_dim, d_model)
        self.dropout = nn.Dropout(dropout)            # on the attention weights
        self.impl = impl                              # TransformerConfig.attn_impl
        self.record_weights = False                   # keep the weights of the last call (for plots)
        self.last_weights: torch.Tensor | None = None  # (B, H, T, S) when record_weights is on

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_head, self.head_dim).transpose(1, 2)   # (B, L, H*Dh) -> (B, H, L, Dh)

    def project(self, x: torch.Tensor, projections: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
        """x (B, L, D) -> one (B, H, L, Dh) tensor per projection (q, k, v or k, v), as one product with
        the weights stacked (a training step 1.15x as fast in fp32, 1.2x in bf16); one position (a
        cached decoding step) keeps them apart: stacking every step would cost more than it saves."""
        if x.shape[1] == 1:
            return [self.split_heads(proj(x)) for proj in projections]
        weight = torch.cat([proj.weight for proj in projections])             # (n * H*Dh, D)
        bias = torch.cat([proj.bias for proj in projections])
        return [self.split_heads(t) for t in F.linear(x, weight, bias).chunk(len(projections), dim=-1)]

    def self_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                       cache: dict | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D), each position attending to the positions of x itself: those that
        mask (B, 1, 1, T) allows (the encoder: real tokens), or with causal itself and those before it
        (the decoder). While decoding (Transformer.decode_step), x is the one new position and cache
        {"k", "v"} holds the keys and values of the positions before it: this position's are appended,
        and it attends to them all, with no causal mask (there is no future in the cache to hide)."""
        q, k, v = self.project(x, (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, Dh) each
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)   # (B, H, t, Dh)
            cache["k"], cache["v"] = k, v
            causal = False
        return self.attend(q, k, v, mask, causal)

    def cross_attention(self, y: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                        cache: dict | None = None) -> torch.Tensor:
        """y (B, T, D) queries over memory (B, S, D), the encoder output; mask (B, 1, 1, S), True
        where a key is a real token. While decoding, the memory's keys and values are computed
        at the first step and kept in cache."""
        q = self.split_heads(self.q_proj(y))                             # (B, H, T, Dh)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.project(memory, (self.k_proj, self.v_proj))     # (B, H, S, Dh) each
            if cache is not None:
                cache["k"], cache["v"] = k, v
        return self.attend(q, k, v, mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """q (B, H, T, Dh) over k, v (B, H, S, Dh) -> (B, T, D): the heads side by side, then out_proj."""
        B, H, T, Dh = q.shape
        impl = self.impl if self.impl != "auto" else ("math" if q.device.type == "cpu" else "sdpa")
        # H = 0 (all heads pruned: out_proj adds its bias alone) is explicit: fused CUDA kernels fail on it
        if impl == "sdpa" and H > 0 and not self.record_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 dropout_p=self.dropout.p if self.training else 0.0)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)                # (B, H, T, S)
            if causal:                                                      # (T = S) query t sees keys 0..t
                future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))          # padded keys
            weights = scores.softmax(dim=-1)                                # (B, H, T, S), rows sum to 1
            if self.record_weights:
                self.last_weights = weights.detach()
            out = self.dropout(weights) @ v                                 # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))    # (B, T, H*Dh) -> (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))


class Residual(nn.Module):
    """x + dropout(f(norm(x))) with pre-LN, or norm(x + dropout(f(x))) with post-LN."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, n_self: int):
        super().__init__()
        Dh = cfg.d_model // cfg.n_head
        self.self_attn = MultiHeadAttention(cfg.d_model, n_self, Dh, cfg.attn_dropout, cfg.attn_impl)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.ff_dropout)
        self.res_attn = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)
        self.res_ff = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.res_attn(x, lambda h: self.self_attn.self_attention(h, src_mask))
        return self.res_ff(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, n_self: int, n_cross: int):
        super().__init__()
        Dh = cfg.d_model // cfg.n_head
        self.self_attn = MultiHeadAttention(cfg.d_model, n_self, Dh, cfg.attn_dropout, cfg.attn_impl)
        self.cross_attn = MultiHeadAttention(cfg.d_model, n_cross, Dh, cfg.attn_dropout, cfg.attn_impl)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.ff_dropout)
        self.res_self = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)
        self.res_cross = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)
        self.res_ff = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
                cache: dict | None = None) -> torch.Tensor:
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        y = self.res_self(y, lambda h: self.self_attn.self_attention(h, causal=True, cache=self_cache))
        y = self.res_cross(y, lambda h: self.cross_attn.cross_attention(h, memory, src_mask, cross_cache))
        return self.res_ff(y, self.ff)


class Transformer(nn.Module):
    kind = "transformer"

    def __init__(self, cfg: TransformerConfig, verbose: bool = True):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        if cfg.share_src_tgt and cfg.src_vocab != cfg.tgt_vocab:
            raise ValueError("share_src_tgt needs one joint vocabulary (joint_vocab=True)")
        if cfg.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl='{cfg.attn_impl}' is not known: use 'auto', 'sdpa' or 'math'")
        self.cfg = cfg
        heads = lambda given, n: list(given) or [cfg.n_head] * n   # noqa: E731
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.d_model)
        self.src_embed = self.tgt_embed if cfg.share_src_tgt else nn.Embedding(cfg.src_vocab, cfg.d_model)
        self.register_buffer("positions", sinusoidal_positions(4096, cfg.d_model), persistent=False)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, h) for h in heads(cfg.enc_self_heads, cfg.n_enc_layer))
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg, hs, hc) for hs, hc in zip(heads(cfg.dec_self_heads, cfg.n_dec_layer),
                                                       heads(cfg.dec_cross_heads, cfg.n_dec_layer)))
        # pre-LN leaves the residual stream un-normalised, so each stack ends with a LayerNorm
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.out_proj = nn.Linear(cfg.d_model, cfg.tgt_vocab, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_output:
            self.out_proj.weight = self.tgt_embed.weight
        if verbose:
            print(f"Transformer: {self.num_params() / 1e6:.2f}M parameters")

    def _init_weights(self, module: nn.Module) -> None:
        # Embeddings ~ normal with standard deviation D^-1/2 (variance 1/D): times sqrt(D) they enter
        # at unit scale, and as the (tied) output projection they give logits of about unit variance,
        # so the loss at step 0 is close to ln V (uniform guessing) instead of far above it.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.d_model ** -0.5)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_modules(self) -> dict[str, list[MultiHeadAttention]]:
        """The attention modules by type, layer order: 'enc' (encoder self), 'dec' (decoder self), 'cross'."""
        return {"enc": [layer.self_attn for layer in self.encoder],
                "dec": [layer.self_attn for layer in self.decoder],
                "cross": [layer.cross_attn for layer in self.decoder]}

    @torch.no_grad()
    def attention_weights(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every head's attention while reading tgt_in with teacher forcing: {'enc': [(B, H, S, S)
        per layer], 'dec': [(B, H, T, T)], 'cross': [(B, H, T, S)]}, queries by keys; padded keys get 0."""
        modules = self.attention_modules()
        for layers in modules.values():
            for m in layers:
                m.record_weights, m.last_weights = True, None
        try:
            self(src, tgt_in)
            return {kind: [m.last_weights for m in layers] for kind, layers in modules.items()}
        finally:
            for layers in modules.values():
                for m in layers:
                    m.record_weights, m.last_weights = False, None    # no batch is kept in memory

    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-attention weights while reading tgt_in, one (B, T, S) map per decoder layer and
        head: {'layer 1 head 1': ..., ...}; a layer whose heads were all pruned has none."""
        return {f"layer {i + 1} head {h + 1}": w[:, h]
                for i, w in enumerate(self.attention_weights(src, tgt_in)["cross"]) for h in range(w.shape[1])}

    def embed(self, table: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = table(ids) * math.sqrt(self.cfg.d_model)                     # (B, L, D)
        return self.embed_dropout(x + self.positions[start:start + ids.shape[1]])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory: (encoder output (B, S, D), key mask (B, 1, 1, S), True = real token)."""
        src_mask = (src != self.cfg.pad_id)[:, None, None, :]
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: tuple, cache: dict | None = None) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V); with a cache (decode_step's), tgt_in is the one new
        position (T = 1), whose position in the sentence is the number of positions decoded so far."""
        enc_out, src_mask = memory
        start = cache["length"] if cache is not None else 0
        y = self.embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, enc_out, src_mask, cache["layers"][i] if cache is not None else None)
        if cache is not None:
            cache["length"] = start + tgt_in.shape[1]
        return self.out_proj(self.dec_norm(y))                            # (B, T, V)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> logits (B, T, V) for every position at once."""
        return self.decode(tgt_in, self.encode(src))

    def decode_step(self, y: torch.Tensor, memory: tuple, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """One step: y (B,) the previous token -> logits (B, V), and the cache grown (a step costs O(T), not O(T^2)).
        The whole cache, made here at the first step (cache=None) and filled by the attentions:

            {"length": t,                                     positions decoded so far (decode)
             "layers": [{"self":  {"k": ..., "v": ...},       per decoder layer: (B, H, t, Dh) of the
                         "cross": {"k": ..., "v": ...}}]}     steps so far (self_attention), and (B, H, S, Dh)
                                                              of the encoder output, made once (cross_attention)
        """
        if cache is None:
            cache = {"length": 0, "layers": [{"self": {}, "cross": {}} for _ in self.decoder]}
        return self.decode(y[:, None], memory, cache)[:, -1], cache
