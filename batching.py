"""
Batches: the sentences of a tokenized split (data.Split) grouped into batches of a token budget,
similar lengths together (the "bucketing" of fairseq and tensor2tensor), padded per batch, a new
order every epoch:

    batches = make_batches(split.src_lens, split.tgt_lens, batch_tokens=6000, seed=1337, epoch=0)
    src, tgt_in, tgt_out = collate(split, batches[0], src_tok, tgt_tok)    # (B, S), (B, T), (B, T)

TrainBatches walks them epoch after epoch for train.py, by position, so a resumed run takes the
batch the interrupted one would have taken. Leaves out: buckets of fixed length boundaries,
assembling batches in another process.
"""

import numpy as np
import torch

# sentences sorted together by length before they are cut into batches: padding on Multi30k at
# 4k tokens per batch is 7.5% with pools of 8k sentences, 2.9% from 32k on (docs/robustness.md)
LENGTH_POOL = 65536


def batch_cost(n: int, max_src: int, max_tgt: int) -> int:
    """Tokens a batch occupies once padded: n sentences x (longest source + longest target)."""
    return n * (max_src + max_tgt)


def make_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, batch_tokens: int, *, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, pool_size: int = LENGTH_POOL) -> list[np.ndarray]:
    """Group sentence indices into batches of at most `batch_tokens` padded tokens.

    Lengths are of the ids as stored; the source gains <eos> and the target <bos>/<eos> at
    collation, so each counts one extra token here. With shuffle: a permutation seeded by
    (seed, epoch), then sorted by length inside pools of `pool_size` sentences (similar
    lengths -> little padding; sentences of equal lengths keep their shuffled order, so the
    batches differ every epoch), then the batch order is shuffled. Without shuffle: one fixed length-sorted order, the same every epoch.
    A sentence longer than the whole budget gets a batch of its own.
    """
    src_lens, tgt_lens = np.asarray(src_lens) + 1, np.asarray(tgt_lens) + 1
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(src_lens)) if shuffle else np.arange(len(src_lens))
    pools = [order[i:i + pool_size] for i in range(0, len(order), pool_size)] if shuffle else [order]
    batches = []
    for pool in pools:
        # sort by target length, then source length in a snake order, up for even target lengths and
        # down for odd: (t, s) = (4, 2) (4, 9) (5, 9) (5, 3), so a batch that straddles two target
        # lengths does not jump from the longest source back to the shortest (ties keep the shuffle)
        snake = np.where(tgt_lens[pool] % 2 == 0, src_lens[pool], -src_lens[pool])
        pool = pool[np.lexsort((snake, tgt_lens[pool]))]
        start, max_s, max_t = 0, 0, 0
        for j, i in enumerate(pool):
            s, t = max(max_s, src_lens[i]), max(max_t, tgt_lens[i])
            if j > start and batch_cost(j - start + 1, s, t) > batch_tokens:
                batches.append(pool[start:j])
                start, s, t = j, src_lens[i], tgt_lens[i]
            max_s, max_t = s, t
        batches.append(pool[start:])
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(split, idx: np.ndarray, src_tok, tgt_tok):
    """Sentence indices of a data.Split -> (src (B, S), tgt_in (B, T), tgt_out (B, T)) int64 tensors.

    src = ids + <eos>; tgt_in = <bos> + ids; tgt_out = ids + <eos> (tgt_in shifted left by one).
    Each is right-padded with the pad id to the longest sentence of this batch only.
    """
    B = len(idx)
    S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
    src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
    tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
    for b, i in enumerate(idx):
        s, t = split.src(i), split.tgt(i)
        src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
        tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
        tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
    return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)


class TrainBatches:
    """The training split cut into token-budget batches, epoch after epoch: a position (epoch, i)
    names a batch, so a resumed run takes exactly the batch the interrupted one would have taken.
    overfit_batches > 0: the first N batches only, unshuffled, every epoch alike."""

    def __init__(self, data, batch_tokens: int, seed: int, overfit_batches: int = 0):
        self.data, self.batch_tokens, self.seed, self.overfit = data, batch_tokens, seed, overfit_batches
        self.epoch, self.batches = -1, []

    def of_epoch(self, epoch: int) -> list:
        """The batches of one epoch (arrays of sentence indices), made once per epoch."""
        if epoch != self.epoch:
            sp = self.data.splits["train"]
            if self.overfit:
                self.batches = make_batches(sp.src_lens, sp.tgt_lens, self.batch_tokens, shuffle=False)[:self.overfit]
            else:                            # a new order every epoch
                self.batches = make_batches(sp.src_lens, sp.tgt_lens, self.batch_tokens, seed=self.seed, epoch=epoch)
            self.epoch = epoch
        return self.batches

    def next(self, epoch: int, i: int) -> tuple:
        """((src, tgt_in, tgt_out) CPU tensors of the batch at position i of `epoch`, or of the next
        epoch's first if this one is done; the position after it, epoch and i)."""
        if i >= len(self.of_epoch(epoch)):
            epoch, i = epoch + 1, 0
        batch = collate(self.data.splits["train"], self.of_epoch(epoch)[i], self.data.src_tok, self.data.tgt_tok)
        return batch, epoch, i + 1

    def epochs_done(self, epoch: int, i: int) -> float:
        """Passes over the training data so far, as a fraction (2.5 = half way through the third)."""
        return epoch + i / len(self.of_epoch(epoch))
