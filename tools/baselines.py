"""A module for tools/bench.py, not a command: the models and loss a user would take instead of
this project's, built at this project's sizes: torch.nn.Transformer with our embeddings and positions, and Hugging Face MarianMT
from a config (random weights, nothing downloaded; needs requirements-bench.txt), trained with
F.cross_entropy and label smoothing.
"""

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
from model_transformer import sinusoidal_positions  # noqa: E402


def torch_loss(logits: torch.Tensor, tgt_out: torch.Tensor, pad_id: int, smoothing: float) -> torch.Tensor:
    """The loss a user of torch.nn.Transformer or MarianMT writes: F.cross_entropy with label
    smoothing, summed over real tokens (this project's is loss.py, written out for speed)."""
    return F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=pad_id,
                           label_smoothing=smoothing, reduction="sum")


class TorchTransformer(nn.Module):
    """torch.nn.Transformer at our sizes, with the same embeddings (shared, scaled by sqrt(D)),
    sinusoidal positions, pre-/post-LN choice and tied output projection."""

    def __init__(self, cfg: dict):
        super().__init__()
        D, V = cfg["d_model"], cfg["tgt_vocab"]
        self.pad_id, self.scale = cfg["pad_id"], math.sqrt(D)
        self.embed = nn.Embedding(V, D)
        self.register_buffer("positions", sinusoidal_positions(1024, D), persistent=False)
        self.core = nn.Transformer(D, cfg["n_head"], cfg["n_enc_layer"], cfg["n_dec_layer"], cfg["d_ff"],
                                   cfg["dropout"], batch_first=True, norm_first=cfg["pre_norm"])
        self.out_proj = nn.Linear(D, V, bias=False)
        self.out_proj.weight = self.embed.weight

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        S, T = src.shape[1], tgt_in.shape[1]
        x = self.embed(src) * self.scale + self.positions[:S]
        y = self.embed(tgt_in) * self.scale + self.positions[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=src.device)
        h = self.core(x, y, tgt_mask=causal, src_key_padding_mask=src == self.pad_id,
                      memory_key_padding_mask=src == self.pad_id, tgt_is_causal=True)
        return self.out_proj(h)                                             # (B, T, V)


class Marian(nn.Module):
    """Hugging Face MarianMT built from a config at our sizes (random weights, nothing downloaded)."""

    def __init__(self, cfg: dict, bos_id: int, eos_id: int):
        super().__init__()
        from transformers import MarianConfig, MarianMTModel
        self.pad_id = cfg["pad_id"]
        self.model = MarianMTModel(MarianConfig(
            vocab_size=cfg["tgt_vocab"], d_model=cfg["d_model"], encoder_layers=cfg["n_enc_layer"],
            decoder_layers=cfg["n_dec_layer"], encoder_attention_heads=cfg["n_head"],
            decoder_attention_heads=cfg["n_head"], encoder_ffn_dim=cfg["d_ff"], decoder_ffn_dim=cfg["d_ff"],
            dropout=cfg["dropout"], attention_dropout=cfg["dropout"], activation_dropout=cfg["dropout"],
            activation_function="relu",
            pad_token_id=self.pad_id, eos_token_id=eos_id, decoder_start_token_id=bos_id,
            max_position_embeddings=1024, share_encoder_decoder_embeddings=True, scale_embedding=True))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=src, attention_mask=src != self.pad_id, decoder_input_ids=tgt_in,
                          decoder_attention_mask=tgt_in != self.pad_id).logits


if __name__ == "__main__":
    raise SystemExit("tools/baselines.py is a module for tools/bench.py, not a command: see python tools/bench.py -h")
