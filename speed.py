"""
Speed: a faster stand-in for nn.Dropout, computing what it computes, and the choice of attention
kernels on a GPU. train.build_model and the checkpoint loader (checkpoint.py) apply it to every
model they build, where the call is in plain sight:

    model = speed_up(model)       # in place; returns the model

- FastDropout for nn.Dropout: one 64-bit random number serves four elements, read as four 16-bit
  integers (~3x cheaper than F.dropout on a CPU, where a random number per element was 16-36% of a
  training step; docs/performance.md). On a GPU F.dropout, one fused kernel, is used.
- On CUDA, F.scaled_dot_product_attention without its cuDNN backend (see speed_up).
tests/test_speed.py checks both against the plain code. Leaves out: torch.compile, CUDA graphs.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def speed_up(model: nn.Module) -> nn.Module:
    """In place, every nn.Dropout module of the model becomes a FastDropout of the same p (the
    module is replaced; parameters and state dict stay). The same dropout with p rounded to a
    multiple of 1/65536 (p = 0.1 drops with probability 6554/65536 = 0.100006), and other random
    draws than nn.Dropout's; without dropout (model.eval(), p = 0) the outputs are the same."""
    # On CUDA, PyTorch 2.11 sends SDPA with a padding mask to cuDNN first, which builds an execution
    # plan for every new (batch, length) shape, ~0.4 s forward and ~0.5 s backward; bucketed batches
    # and the growing decoding cache bring new shapes all the time. Flash and memory-efficient
    # attention need no plan. (A process-wide switch; on a CPU it changes nothing.)
    torch.backends.cuda.enable_cudnn_sdp(False)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    return model
