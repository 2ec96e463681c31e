"""
Turning a trained model into translations, for every model that has the shared interface
(`encode`, `decode_step`, and `forward` for the uncached reference):

    greedy(model, src, ...)          the most likely token at each step, with the model's cache
    greedy_uncached(model, src, ...) the same, recomputing the whole prefix each step (slow;
                                     the reference the cached version must equal)
    translate(model, tokenizers, sentences)   raw text in, raw text out, in input order

Used by train.py (validation BLEU) and sample.py. Leaves out: sampling with temperature.
"""

import numpy as np
import sacrebleu
import torch


def max_target_len(src_len: int, a: float = 1.5, b: int = 10) -> int:
    """Stop decoding after a * source length + b tokens (a model that never emits <eos>)."""
    return int(a * src_len + b)


@torch.no_grad()
def greedy(model, src: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int) -> torch.Tensor:
    """src (B, S) -> hypotheses (B, <= max_len) without <bos>; after <eos> only pad."""
    B = src.shape[0]
    memory = model.encode(src)
    y = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    cache, out = None, []
    for _ in range(max_len):
        logits, cache = model.decode_step(y, memory, cache)             # (B, V)
        y = logits.argmax(dim=-1).masked_fill(done, pad_id)
        out.append(y)
        done |= y == eos_id
        if done.all():
            break
    return torch.stack(out, dim=1)                                      # (B, T)


@torch.no_grad()
def greedy_uncached(model, src: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int) -> torch.Tensor:
    """Greedy decoding that runs the full teacher-forced forward on the whole prefix every step."""
    B = src.shape[0]
    prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        y = model(src, prefix)[:, -1].argmax(dim=-1).masked_fill(done, pad_id)   # (B,)
        prefix = torch.cat([prefix, y[:, None]], dim=1)
        done |= y == eos_id
        if done.all():
            break
    return prefix[:, 1:]


def strip_special(ids: list[int], eos_id: int) -> list[int]:
    """Cut a hypothesis at its first <eos>."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def translate(model, src_tok, tgt_tok, sentences: list[str], batch_size: int = 64,
              max_src_len: int = 256, device: str = "cpu", amp=None, warn=print) -> list[str]:
    """Translate raw sentences; returns one string per input, in input order.

    Sentences are sorted by length and decoded in batches (less padding, fewer wasted steps),
    then put back in order. Empty inputs give empty outputs; inputs longer than max_src_len
    tokens are truncated with a warning naming the line.
    """
    was_training = model.training
    model.eval()
    encoded = []
    for i, text in enumerate(sentences):
        ids = src_tok.encode(text)
        if len(ids) > max_src_len:
            warn(f"warning: input line {i + 1} has {len(ids)} tokens; truncated to {max_src_len}")
            ids = ids[:max_src_len]
        encoded.append(ids)
    out = [""] * len(sentences)
    order = [i for i in np.argsort([len(e) for e in encoded], kind="stable") if sentences[i].strip()]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        S = max(len(encoded[i]) for i in idx) + 1
        src = torch.full((len(idx), S), src_tok.pad_id, dtype=torch.long)
        for b, i in enumerate(idx):
            src[b, :len(encoded[i]) + 1] = torch.tensor(encoded[i] + [src_tok.eos_id])
        src = src.to(device)
        with amp if amp is not None else torch.autocast("cpu", enabled=False):
            hyps = greedy(model, src, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id, max_target_len(S))
        for b, i in enumerate(idx):
            out[i] = tgt_tok.decode(strip_special(hyps[b].tolist(), tgt_tok.eos_id))
    model.train(was_training)
    return out


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus sacreBLEU (13a tokenisation, cased) and chrF, with their signatures."""
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_str": str(b), "chrf_str": str(c),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
