"""A module for tools/bench.py and the tests, not a command: decoding as it is often first
written, without a cache, the slow reference that decoding.greedy must equal.

    hyps = greedy_uncached(model, src, bos_id, eos_id, pad_id, max_len)   # (B, <= max_len)
"""

import contextlib

import torch


@contextlib.contextmanager
def last_position_only(model):
    """While inside, model.out_proj (both models' last layer) projects only the last position,
    so decode(...) returns (B, 1, V): what a first uncached greedy search computes (projecting
    every position would make it look slower than it needs to be). A forward pre-hook, removed on exit."""
    handle = model.out_proj.register_forward_pre_hook(lambda module, inputs: (inputs[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def greedy_uncached(model, src: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int) -> torch.Tensor:
    """Greedy decoding without a cache: the encoder runs once, but every step runs the decoder
    over the whole prefix again (O(T^2) work). src (B, S) -> hypotheses (B, <= max_len) without
    <bos>, after <eos> only pad: decoding.greedy's first output, token for token."""
    B = src.shape[0]
    memory = model.encode(src)
    prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    with last_position_only(model):
        for _ in range(max_len):
            y = model.decode(prefix, memory)[:, -1].argmax(dim=-1).masked_fill(done, pad_id)   # (B,)
            prefix = torch.cat([prefix, y[:, None]], dim=1)
            done |= y == eos_id
            if done.all():
                break
    return prefix[:, 1:]


if __name__ == "__main__":
    raise SystemExit("tools/reference.py is a module for tools/bench.py and the tests, not a command: see python tools/bench.py -h")
