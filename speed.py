"""
Speed: faster stand-ins for two parts of model_transformer.py, computing what they compute, and
the choice of attention kernels on a GPU. train.py and the checkpoint loader (checkpoint.py) put
them into every model they build:

    model = speed_up(model)       # in place; returns the model

- FastDropout for nn.Dropout: one 64-bit random number serves four elements, read as four
  16-bit integers (~3x cheaper than F.dropout on this CPU, where one random number per element
  was 16-36% of a training step). On a GPU F.dropout is one fused kernel and is used.
- StackedProjections for MultiHeadAttention: the q, k, v (or k, v) projections as one matrix
  product with the weights stacked, one pass over x and one bf16 cast of it instead of three
  (1.15x fp32, 1.2x bf16 per training step).
- On CUDA, F.scaled_dot_product_attention without its cuDNN backend (see speed_up).
The figures are docs/performance.md's; tests/test_speed.py checks each stand-in against the
plain module. Leaves out: torch.compile, CUDA graphs (tried: docs/performance.md).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_transformer import MultiHeadAttention


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p, scale the others by 1 / (1 - p).

    F.dropout's semantics with p rounded to a multiple of 1/65536: an element is dropped when its
    16-bit integer is among the lowest p * 65536."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    k = round(p * 65536)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= k - 32768     # int16 spans -32768..32767
    return x * (keep.to(x.dtype) * (65536 / (65536 - k)))


class FastDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


class StackedProjections(MultiHeadAttention):
    """MultiHeadAttention whose projections of one input run as one product (same weights, same
    state dict). A single position (one cached decoding step) keeps the three products apart:
    stacking the weights every step costs more than it saves there."""

    def stacked(self, x: torch.Tensor, layers: list[nn.Linear]) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            return [self.split_heads(layer(x)) for layer in layers]
        weight = torch.cat([layer.weight for layer in layers])            # (len(layers) * H*Dh, D)
        bias = torch.cat([layer.bias for layer in layers])
        return [self.split_heads(t) for t in F.linear(x, weight, bias).chunk(len(layers), dim=-1)]

    def project_qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stacked(x, [self.q_proj, self.k_proj, self.v_proj])

    def project_kv(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stacked(x, [self.k_proj, self.v_proj])


def speed_up(model: nn.Module) -> nn.Module:
    """Swap this file's stand-ins into a model, in place: every nn.Dropout becomes a FastDropout
    of the same p, every MultiHeadAttention a StackedProjections (its class changes; its
    parameters, hooks and state dict stay). Parameters and outputs are unchanged; only the
    random draws of dropout differ from nn.Dropout's."""
    # On CUDA, PyTorch 2.11 sends SDPA with a padding mask to cuDNN first, which builds an execution
    # plan for every new (batch, length) shape, ~0.4 s forward and ~0.5 s backward; bucketed batches
    # and the growing decoding cache bring new shapes all the time. Flash and memory-efficient
    # attention need no plan. (A process-wide switch; on a CPU it changes nothing.)
    torch.backends.cuda.enable_cudnn_sdp(False)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
        if type(module) is MultiHeadAttention:
            module.__class__ = StackedProjections
    return model
