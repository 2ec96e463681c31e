"""
Turning a trained model into translations, for every model that has the shared interface
(`encode` and `decode_step`):

    greedy(model, src, ...)          the most likely token at each step, with the model's cache
    beam_search(model, src, ...)     the `beam` best prefixes at each step, GNMT length penalty
    translate(model, src_tok, tgt_tok, sentences)   raw text in, raw text out, in input order
    evaluate(model, data, ...)       loss and BLEU/chrF on a split (train.py's validation)
    score(hypotheses, references)    sacreBLEU, cased and lower-cased, and chrF

Memory and cache are whatever the model returns; every tensor in them is batch-first, so
`select_rows` reorders them when beams are reselected (no model-type branches). Decoding without
a cache, the reference these must equal, is tools/reference.py's. Leaves out: sampling, ensembles.
"""

import math

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF

from batching import collate, make_batches
from loss import sequence_loss


def max_target_len(src_len: int, a: float = 1.5, b: int = 10) -> int:
    """Stop decoding after a * source length + b tokens (a model that never emits <eos>)."""
    return int(a * src_len + b)


@torch.no_grad()
def greedy(model, src: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int | list[int]) -> tuple:
    """src (B, S) -> (hypotheses (B, <= max_len) without <bos>, after <eos> only pad;
    scores (B,) the sum of the chosen tokens' log-probabilities, <eos> included). max_len: the most
    tokens of every hypothesis, or of each (a list): a sentence decodes as it would alone."""
    B = src.shape[0]
    memory = model.encode(src)
    y = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    limits = torch.as_tensor(max_len, device=src.device).expand(B)             # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    scores = torch.zeros(B, device=src.device)
    cache, out = None, []
    for t in range(int(limits.max())):
        logits, cache = model.decode_step(y, memory, cache)             # (B, V)
        logp = logits.float().log_softmax(dim=-1)
        y = logp.argmax(dim=-1)
        scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
        y = y.masked_fill(done, pad_id)
        out.append(y)
        done |= (y == eos_id) | (t + 1 >= limits)
        if done.all():
            break
    return torch.stack(out, dim=1), scores                              # (B, T), (B,)


def select_rows(tree, rows: torch.Tensor):
    """Index every tensor in a nest of dicts/tuples/lists by its first (batch) dimension;
    anything else (step counters, None) is kept as is. Reorders memory and cache in beam search."""
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, rows)
    if isinstance(tree, dict):
        return {key: select_rows(value, rows) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        items = [select_rows(value, rows) for value in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)   # (a NamedTuple)
    return tree


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al. 2016): a hypothesis is ranked by log P(y) / ((5 + |y|) / 6) ** alpha.
    alpha = 0 ranks by raw log-probability (short outputs win); larger alpha favours longer ones."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int | list[int], beam: int = 5,
                alpha: float = 0.6, nbest: int = 1) -> list[list[tuple[list[int], float]]]:
    """src (B, S) -> for each sentence its `nbest` best hypotheses as (token ids without <bos> and
    <eos>, the sum of their token log-probabilities: with <eos> for a hypothesis that ended, without
    for one still going at max_len), best first under the length penalty. max_len: the most tokens
    of every hypothesis, or of each sentence's (a list).

    The sentences are decoded together, K = beam rows each, one row per live hypothesis; row
    a * K + k is beam k of active sentence a, in memory, cache and prefixes alike. At each step:

        scores (A, K) + log p (A, K, V)  ->  per sentence the 2K best of its K * V extensions
            e.g. K = 2, V = 5: flat index 7 = beam 1, token 2; its parent row a * K + 1
        those among the K best that end in <eos>  ->  finished[sentence], with their score / lp
        the K best that do not end (there are at least K among 2K: at most K end, one per beam)
            ->  the next step's rows: each takes its parent row's cache and prefix, plus its token
        a sentence is done when no live hypothesis can still beat its nbest-th finished one;
            done sentences leave every tensor, so a long sentence does not keep short ones computing

    A live score can only fall with more tokens, so it ranks at best at its score over the largest
    length penalty still reachable (alpha 0.6, max_len 20: a live -2.1 ranks at best -2.1 / lp(20)
    = -0.89, above a finished -0.95). Stopping when the top beam ends would be wrong once alpha > 0:
    a longer hypothesis may still overtake it. With beam = 1 and alpha = 0 this is greedy decoding.
    """
    assert 1 <= nbest <= beam, f"nbest={nbest} must be between 1 and beam={beam}"
    B, K, dev = src.shape[0], beam, src.device
    lp = lambda n: length_penalty(n, alpha)                                     # noqa: E731
    limit = [max_len] * B if isinstance(max_len, int) else list(max_len)       # per sentence
    memory = select_rows(model.encode(src), torch.arange(B, device=dev).repeat_interleave(K))   # K rows each
    sentence = list(range(B))                       # the original index of each active sentence
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(B)]   # (score / lp, ids, score)
    scores = torch.full((B, K), float("-inf"), device=dev)      # each beam's sum of log-probabilities;
    scores[:, 0] = 0.0                                          # at the start only beam 0 is live
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=dev)               # (A*K, t-1) prefixes so far
    y = torch.full((B * K,), bos_id, dtype=torch.long, device=dev)
    cache = None
    for t in range(1, max(limit) + 1):              # t = length of the hypotheses after this step
        logits, cache = model.decode_step(y, memory, cache)                     # (A*K, V)
        A, V = len(sentence), logits.shape[-1]
        logp = logits.float().log_softmax(dim=-1).view(A, K, V)
        top, flat = (scores[:, :, None] + logp).view(A, K * V).topk(2 * K, dim=1)  # (A, 2K) best first
        parent = torch.arange(A, device=dev)[:, None] * K + flat // V           # (A, 2K) the row extended
        token = flat % V
        ends = token == eos_id
        for a, j in ends[:, :K].nonzero().tolist():     # <eos> among the K best: a finished hypothesis
            if top[a, j] > float("-inf"):
                score = top[a, j].item()
                finished[sentence[a]].append((score / lp(t), tokens[parent[a, j]].tolist(), score))
        keep = ends.int().argsort(dim=1, stable=True)[:, :K]        # the K best not ending (stable: best first)
        scores, token, parent = top.gather(1, keep), token.gather(1, keep), parent.gather(1, keep)   # (A, K)
        active = []
        for a, b in enumerate(sentence):
            if sentence_done(finished[b], scores[a], t, limit[b], nbest, lp):
                continue
            if t == limit[b]:                       # out of steps: the live hypotheses count as they are
                finished[b].extend((s / lp(t), tokens[parent[a, k]].tolist() + [token[a, k].item()], s)
                                   for k, s in enumerate(scores[a].tolist()) if s > float("-inf"))
            else:
                active.append(a)
        if not active:
            break
        if len(active) < A:                         # done sentences leave the batch
            keep_sent = torch.tensor(active, device=dev)
            scores, token, parent = scores[keep_sent], token[keep_sent], parent[keep_sent]
            sentence = [sentence[a] for a in active]
        rows = parent.view(-1)                      # (A'*K,) the row each live hypothesis extends
        tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)
        cache = select_rows(cache, rows)
        if len(active) < A:                         # a sentence's K memory rows are alike: any of its rows serves
            memory = select_rows(memory, rows)
        y = token.view(-1)
    return [[(ids, raw) for _, ids, raw in sorted(hyps, key=lambda h: -h[0])[:nbest]] for hyps in finished]


def sentence_done(finished: list, live_scores: torch.Tensor, t: int, max_len: int, nbest: int, lp) -> bool:
    """Whether no live hypothesis of a sentence can beat its nbest-th finished one: the best live score
    (live_scores[0]) over the largest length penalty still reachable, against that finished score."""
    ranked = sorted((h[0] for h in finished), reverse=True)
    return len(ranked) >= nbest and ranked[nbest - 1] >= (live_scores[0] / max(lp(t + 1), lp(max_len))).item()


def strip_special(ids: list[int], eos_id: int) -> list[int]:
    """Cut a hypothesis at its first <eos>."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def length_sorted_batches(encoded: list[list[int]], pad_id: int, eos_id: int,
                          batch_size: int) -> list[tuple[list[int], torch.Tensor]]:
    """Source token lists -> (input indices, padded (B, S) batch with <eos> appended), sorted by
    length so a batch holds sentences of similar length (less padding, fewer wasted steps).
    Empty lists are left out."""
    order = [i for i in np.argsort([len(e) for e in encoded], kind="stable") if encoded[i]]
    batches = []
    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start:start + batch_size]]
        src = torch.full((len(idx), max(len(encoded[i]) for i in idx) + 1), pad_id, dtype=torch.long)
        for b, i in enumerate(idx):
            src[b, :len(encoded[i]) + 1] = torch.tensor(encoded[i] + [eos_id])
        batches.append((idx, src))
    return batches


def precision(amp):
    """The autocast context to run the model in: the run's (bf16/fp16), else full precision."""
    return amp if amp is not None else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def translate_nbest(model, src_tok, tgt_tok, sentences: list[str], beam: int = 1, alpha: float = 0.6,
                    nbest: int = 1, batch_size: int = 64, max_src_len: int = 256, max_len_a: float = 1.5,
                    max_len_b: int = 10, device: str = "cpu", amp=None, warn=print) -> list[list[tuple[str, float]]]:
    """Translate raw sentences: for each input, in input order, its `nbest` translations with
    their scores (sum of token log-probabilities). beam = 1 is greedy decoding. Outputs stop at
    max_len_a * source length + max_len_b tokens (source length with <eos>), each sentence's own.

    Sentences are decoded in length-sorted batches, then put back in order. Empty inputs give
    empty outputs; inputs longer than max_src_len tokens are truncated with a warning naming the line.
    """
    if beam == 1 and nbest > 1:
        raise ValueError(f"nbest={nbest} needs beam search: set beam to at least {nbest}")
    was_training = model.training
    model.eval()
    encoded = []
    for i, text in enumerate(sentences):
        ids = src_tok.encode(text) if text.strip() else []
        if len(ids) > max_src_len:
            warn(f"warning: input line {i + 1} has {len(ids)} tokens; truncated to {max_src_len}")
            ids = ids[:max_src_len]
        encoded.append(ids)
    out: list[list[tuple[str, float]]] = [[("", 0.0)] * nbest for _ in sentences]   # empty in, empty out
    for idx, src in length_sorted_batches(encoded, src_tok.pad_id, src_tok.eos_id, batch_size):
        src, limit = src.to(device), [max_target_len(len(encoded[i]) + 1, max_len_a, max_len_b) for i in idx]
        with precision(amp):
            if beam == 1:
                hyps, scores = greedy(model, src, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id, limit)
                found = [[(strip_special(h, tgt_tok.eos_id), s)] for h, s in zip(hyps.tolist(), scores.tolist())]
            else:
                found = beam_search(model, src, tgt_tok.bos_id, tgt_tok.eos_id, limit, beam, alpha, nbest)
        for b, i in enumerate(idx):
            out[i] = [(tgt_tok.decode(ids), s) for ids, s in found[b]]
    model.train(was_training)
    return out


def translate(model, src_tok, tgt_tok, sentences: list[str], **kwargs) -> list[str]:
    """The best translation of each sentence, in input order (keyword arguments: translate_nbest's)."""
    return [hyps[0][0] for hyps in translate_nbest(model, src_tok, tgt_tok, sentences, **kwargs)]


@torch.no_grad()
def evaluate(model, data, batch_tokens: int, device: str = "cpu", amp=None, split: str = "validation",
             n_sentences: int = 0, n_examples: int = 3) -> dict:
    """On a split of data.Data: the loss (no smoothing) and perplexity over all of it, teacher-forced
    in token-budget batches, and on its first batch how much higher that loss is with each target given
    another sentence's source (source_gain, nats per token: what the model takes from its source);
    BLEU (cased, lower-cased) and chrF of the greedy translations of its first n_sentences (0 = all),
    their length against the references' (length_ratio); the first n_examples."""
    was_training = model.training
    model.eval()
    sp = data.splits[split]
    loss_sum, n_tokens, gain = 0.0, 0, [0.0, 0]         # gain: on the first batch, the loss another source adds
    for i, idx in enumerate(make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False)):
        src, tgt_in, tgt_out = (t.to(device) for t in collate(sp, idx, data.src_tok, data.tgt_tok))
        shuffled = i == 0 and len(src) > 1          # (a model that reads its source does far worse with another)
        with precision(amp):
            logits = model(src, tgt_in)
            other_logits = model(src.roll(1, 0), tgt_in) if shuffled else None
        loss = sequence_loss(logits, tgt_out, data.tgt_tok.pad_id, 0.0)
        tokens = int((tgt_out != data.tgt_tok.pad_id).sum())
        loss_sum, n_tokens = loss_sum + loss.item(), n_tokens + tokens
        if shuffled:
            gain = [gain[0] + (sequence_loss(other_logits, tgt_out, data.tgt_tok.pad_id, 0.0) - loss).item(),
                    gain[1] + tokens]
    n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
    hyps = translate(model, data.src_tok, data.tgt_tok, sp.src_text[:n], device=device, amp=amp)
    scores = score(hyps, sp.tgt_text[:n])
    model.train(was_training)
    loss = loss_sum / max(n_tokens, 1)
    return {"loss": loss, "source_gain": gain[0] / max(gain[1], 1), "ppl": math.exp(min(loss, 50)),
            "bleu": scores["bleu"], "bleu_lc": scores["bleu_lc"], "length_ratio": scores["length_ratio"],
            "chrf": scores["chrf"], "sentences": n, "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i],
                                                                   "hyp": hyps[i]} for i in range(min(n_examples, n))]}


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus sacreBLEU with its 13a tokenisation on detokenized text: cased (this project's
    headline) and lower-cased (`bleu_lc`, close to how published Multi30k results are scored:
    lower-cased, Moses-tokenized references), and chrF; each with its signature."""
    metrics = {"bleu": BLEU(), "bleu_lc": BLEU(lowercase=True), "chrf": CHRF()}
    out = {}
    for name, metric in metrics.items():
        result = metric.corpus_score(hypotheses, [references])
        out.update({name: result.score, f"{name}_str": str(result), f"{name}_signature": str(metric.get_signature())})
        if name == "bleu":                      # the translations' length against the references' (13a tokens)
            out["length_ratio"] = result.sys_len / max(result.ref_len, 1)
    return out
