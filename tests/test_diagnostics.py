"""The diagnostics that name classic bugs in train.py's log (docs/debugging.md): each fires on its
symptom, as a printed warning and a "warning" record of log.jsonl, and stays silent on a healthy
model or signal. In-process, on tiny models (diagnostics.py): the probes of an untrained model before step 1
(probe_model), the checks at the step log's lines (StepChecks, through common.StepLog), those of
the records (Symptoms, through common.RunLog), wired in as train_loop wires them."""
import dataclasses
import json
import math
import os
import types

import pytest
import torch

import decoding
import loss
import textbook
import train
from batching import TrainBatches
from common import RunLog, StepLog
from data import DataConfig, load_data
from diagnostics import probe_model
import probes
from probes import attention_spread
from watch import StepChecks, Symptoms
from loss import sequence_loss
from model_rnn import Seq2SeqRNN
from model_transformer import FeedForward, MultiHeadAttention, Residual, Transformer


class Warnings:
    """Stands in for RunLog: keeps the names of the warnings."""
    def __init__(self):
        self.names, self.texts = [], {}

    def warn(self, name, text, step=0):
        self.names.append(name)
        self.texts[name] = text

    def say(self, text):
        self.said = text


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(dataset="toy:reverse", tokenizer="char", cache_dir=os.environ["NMT_TEST_CACHE"]),
                     verbose=False)


def tiny(data, **knobs):
    """An untrained tiny model of train.py's knobs (TINY's sizes), in training mode, and a first batch."""
    cfg = dict(train.DEFAULTS, tie_embeddings="none", d_model=32, n_head=2, n_enc_layer=2, n_dec_layer=2, d_ff=64,
               **{"dropout": 0.1, **knobs})
    torch.manual_seed(0)
    model = train.build_model(cfg, data.src_tok, data.tgt_tok, verbose=False).train()
    return model, TrainBatches(data, 400, 0).next(0, 0)[0]


def probe(model, batch, data, loss_fn=sequence_loss, textbook: bool = False) -> list[str]:
    """The names of the warnings probe_model gives; textbook_mismatch, which any change to a model's
    code draws (test_a_model_that_computes_otherwise_than_the_textbook_says_where), only with textbook."""
    log = Warnings()
    probe_model(model, batch, loss_fn, data, log, evaluate=decoding.evaluate)
    return [name for name in log.names if textbook or name != "textbook_mismatch"]


@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_the_probes_are_silent_on_a_healthy_untrained_model(data, arch):
    model, batch = tiny(data, arch=arch, attention="dot", bidirectional=True, emb_dim=32, hidden_size=32)
    assert probe(model, batch, data) == []
    assert model.training                                       # it leaves the model as it found it


def test_each_probe_names_its_bug(data, monkeypatch):
    model, batch = tiny(data)
    attend = MultiHeadAttention.attend
    monkeypatch.setattr(MultiHeadAttention, "attend", lambda self, q, k, v, mask=None, causal=False:
                        attend(self, q, k, v, mask, False))                 # no causal mask
    assert probe(model, batch, data) == ["causal_mask", "decoding_mismatch"]   # (decoding has no future to see)
    monkeypatch.setattr(MultiHeadAttention, "attend", lambda self, q, k, v, mask=None, causal=False:
                        attend(self, q * math.sqrt(q.shape[-1]), k, v, mask, causal))   # no 1 / sqrt(Dh)
    assert probe(model, batch, data) == ["attention_scale"]
    monkeypatch.undo()
    encode = Transformer.encode
    monkeypatch.setattr(Transformer, "encode", lambda self, src: (encode(self, src)[0], None))   # no source mask
    assert probe(model, batch, data) == ["padding_mask", "batch_dependence"]
    monkeypatch.undo()
    counts_pads = lambda logits, tgt_out, pad_id, eps: sequence_loss(logits, tgt_out, -1, eps)    # noqa: E731
    assert probe(model, batch, data, counts_pads) == ["padding_in_loss"]
    translate_nbest = decoding.translate_nbest

    def without_eval(model, *args, **kwargs):                                # model.eval() forgotten
        monkeypatch.setattr(model, "eval", lambda: model, raising=False)
        return translate_nbest(model, *args, **kwargs)
    monkeypatch.setattr(decoding, "translate_nbest", without_eval)
    assert probe(model, batch, data) == ["dropout_in_decoding", "validation_loss"]     # (eval() stays a no-op)


def test_the_properties_a_correct_model_has_name_bugs_they_were_not_written_for(data, monkeypatch):
    """Each probe tests a property, not a bug: here bugs unlike the gallery's break one property each."""
    model, batch = tiny(data)
    split = MultiHeadAttention.split_heads
    monkeypatch.setattr(MultiHeadAttention, "split_heads", lambda self, x: split(self, x).reshape(
        x.shape[1], x.shape[0], self.n_head, self.head_dim).transpose(0, 1).reshape(split(self, x).shape))
    assert "batch_leak" in probe(model, batch, data)                    # heads split across the batch dimension
    monkeypatch.undo()
    with torch.no_grad():
        model.positions.zero_()                                          # no positional encoding
    assert probe(model, batch, data)[0] == "no_positions"
    model, batch = tiny(data)
    decode = Transformer.decode
    monkeypatch.setattr(Transformer, "decode", lambda self, tgt_in, memory, cache=None: decode(
        self, tgt_in, memory, None if cache is None else {**cache, "length": 0} if False else cache) if cache is None
        else decode_from_zero(self, decode, tgt_in, memory, cache))
    assert probe(model, batch, data) == ["decoding_mismatch"]            # every decoded token at position 0
    monkeypatch.undo()
    encode = Transformer.encode
    monkeypatch.setattr(Transformer, "encode", lambda self, src: encode(self, src.masked_fill(
        (src != 0).cumsum(1) > 2, 0)))                                  # the source cut after two tokens
    assert probe(model, batch, data)[0] == "source_unread"
    monkeypatch.undo()
    model.out_proj.weight.requires_grad_(False)
    assert probe(model, batch, data) == ["frozen_parameters"]
    model.out_proj.weight.requires_grad_(True)
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, torch.optim.AdamW(model.encoder.parameters()))
    assert log.names == ["not_optimized"] and "checked before step 1 (12 of 13 hold" in log.said


def test_the_properties_name_bugs_written_after_them(data, monkeypatch):
    """Four more bugs, each breaking a property: the loss's definition, cross-attention's reach,
    decoding = training for the GRU, the tokenizer's round trip."""
    model, batch = tiny(data)
    time_major = lambda logits, tgt_out, pad_id, eps: loss.SmoothedCrossEntropy.apply(    # noqa: E731
        logits.transpose(0, 1).reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), pad_id, eps)
    assert probe(model, batch, data, time_major) == ["loss_definition"]
    cross = MultiHeadAttention.cross_attention

    def causal_cross(self, y, memory, mask, cache=None):               # the causal mask on the source too
        causal = torch.ones(y.shape[1], memory.shape[1], dtype=torch.bool).tril()
        return cross(self, y, memory, mask & causal, cache)
    monkeypatch.setattr(MultiHeadAttention, "cross_attention", causal_cross)
    assert probe(model, batch, data)[0] == "source_positions_hidden"
    monkeypatch.undo()
    rnn, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)

    def decode_step(self, y, memory, cache):                            # no sqrt(E) scale while decoding
        logits, hidden = self.run_decoder(self.tgt_embed(y[:, None]), memory,
                                          memory.init if cache is None else cache["hidden"])
        return logits[:, 0], {"hidden": hidden}
    monkeypatch.setattr(type(rnn), "decode_step", decode_step)
    assert probe(rnn, batch, data) == ["decoding_mismatch"]
    monkeypatch.undo()
    monkeypatch.setattr(type(data.tgt_tok), "decode", lambda self, ids: " ".join(self.piece(i) for i in ids))
    assert "tokenizer_round_trip" in probe(model, batch, data)


def test_the_properties_added_after_the_third_held_out_set(data, monkeypatch):
    """The word given at a position moves the prediction there; attention averages; the words are
    about as large as their positions; the batch moves on; the learning rate leaves 0."""
    model, batch = tiny(data)
    monkeypatch.setattr(Residual, "forward", lambda self, x, sublayer: sublayer(self.norm(x)))   # no x +
    assert "target_input_ignored" in probe(model, batch, data)
    monkeypatch.undo()
    monkeypatch.setattr(Transformer, "embed", lambda self, table, ids, start=0: self.embed_dropout(
        table(ids) + self.positions[start:start + ids.shape[1]]))              # no sqrt(d_model)
    assert probe(model, batch, data) == ["embedding_scale"]
    monkeypatch.undo()
    rnn, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)
    monkeypatch.setattr(type(rnn), "attend", lambda self, query, memory: (query @ memory.keys.transpose(1, 2))
                        .masked_fill(~memory.mask[:, None], 0.0) @ memory.outputs)   # scores, no softmax
    assert "attention_not_distribution" in probe(rnn, batch, data)
    monkeypatch.undo()
    log = Warnings()
    checks, run = StepChecks(log, model), types.SimpleNamespace(step=1, epoch=0)
    checks.at_step(run, [batch])
    checks.at_step(types.SimpleNamespace(step=2, epoch=1), [batch])     # an epoch of one batch: fine
    assert log.names == []
    checks.at_step(types.SimpleNamespace(step=3, epoch=1), [batch])
    assert log.names == ["batch_repeated"]
    stuck = Symptoms(peak_lr=1e-3, warmup_frac=0.1)
    stuck("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
    assert [n for s in (25, 100) for n, _ in stuck("train", {"step": s, "loss": 2.0, "lr": 0.0, "progress": 0.0})
            ] == ["lr_schedule"]


def decode_from_zero(self, decode, tgt_in, memory, cache):
    """Transformer.decode with a cache, each new token given position 0 (the offset forgotten)."""
    length = cache["length"]
    cache["length"] = 0
    logits = decode(self, tgt_in, memory, cache)
    cache["length"] = length + tgt_in.shape[1]
    return logits


def test_a_model_that_keeps_state_between_calls_is_named(data, monkeypatch):
    model, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)
    encode, kept = type(model).encode, {}

    def stateful(self, src):                                             # the last batch's first state carried on
        memory = encode(self, src)
        carried = kept.get("init")
        kept["init"] = memory.init.detach()
        return memory._replace(init=carried) if carried is not None and carried.shape == memory.init.shape else memory
    monkeypatch.setattr(type(model), "encode", stateful)
    assert "hidden_state" in probe(model, batch, data)


def test_the_data_checks_name_misaligned_overlapping_and_swapped_splits():
    from data import Data, Split
    from diagnostics import data_checks
    from tokenizer import CharTokenizer
    import random
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(2, 30))) for _ in range(600)]
    tok = CharTokenizer.train(words + [w.upper() for w in words], 100)

    def split(pairs):
        return Split([tok.encode(s) for s, _ in pairs], [tok.encode(t) for _, t in pairs], [s for s, _ in pairs],
                     [t for _, t in pairs])
    pairs = [(w, w.upper()[::-1]) for w in words]
    healthy = {"train": split(pairs[:500]), "validation": split(pairs[500:550]), "test": split(pairs[550:])}
    names = lambda splits: [n for n, _ in data_checks(Data(tok, tok, splits, {}))]   # noqa: E731
    assert names(healthy) == []
    shifted = [(s, t) for (s, _), (_, t) in zip(pairs[:500], pairs[1:501])]          # each source, the next target
    assert names({**healthy, "train": split(shifted)}) == ["misaligned_pairs"]
    assert names({**healthy, "validation": split(pairs[:50])}) == ["split_overlap"]
    assert names({**healthy, "validation": split([(t, s) for s, t in pairs[500:550]])}) == ["sides_swapped"]
    spaceless = [(s.replace(" ", ""), t.replace(" ", "")) for s, t in pairs[500:550]]     # cleaning lost them
    assert names({**healthy, "validation": split(spaceless)}) == ["text_without_spaces"]             # (the references)


def test_a_batch_without_the_teacher_forcing_shift_is_named(data):
    from diagnostics import teacher_forcing_pairs
    src, tgt_in, tgt_out = TrainBatches(data, 400, 0).next(0, 0)[0]
    assert teacher_forcing_pairs((src, tgt_in, tgt_out), data) == []
    assert [n for n, _ in teacher_forcing_pairs((src, tgt_out, tgt_out), data)] == ["target_shift"]   # no shift
    twice = torch.cat([tgt_in[:, :1], tgt_in[:, :-1]], dim=1)                           # shifted twice
    assert [n for n, _ in teacher_forcing_pairs((src, twice, tgt_out), data)] == ["target_shift"]


def test_a_learning_rate_that_never_reaches_its_peak_is_named():
    symptoms = Symptoms(peak_lr=1e-3, warmup_frac=0.1)
    symptoms("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
    low = [symptoms("train", {"step": s, "loss": 1.0, "lr": 1e-5, "progress": s / 300}) for s in (25, 50, 75, 100)]
    assert [n for found in low for n, _ in found] == ["lr_schedule"]                    # once, at 25% of the run
    healthy = Symptoms(peak_lr=1e-3, warmup_frac=0.1)
    healthy("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
    lrs = [8.3e-4, 9.9e-4, 9.5e-4, 9e-4]
    assert not any(healthy("train", {"step": s, "loss": 1.0, "lr": lr, "progress": s / 300})
                   for s, lr in zip((25, 50, 75, 100), lrs))
    for lrs in ([1e-3, 1.2e-3], [5e-4, 1e-3, 9e-4, 9.5e-4]):           # past the peak; rising after the warm-up
        wrong = Symptoms(peak_lr=1e-3, warmup_frac=0.1)
        wrong("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
        found = [wrong("train", {"step": s, "loss": 1.0, "lr": lr, "progress": s / 300})
                 for s, lr in zip((15, 30, 75, 100), lrs)]
        assert [n for f in found for n, _ in f] == ["lr_schedule"]


def test_a_model_that_stops_reading_its_source_is_named_at_the_second_validation():
    def evals(*gains, progress=0.5):
        return [record for i, g in enumerate(gains, 1) for record in (
            ("train", {"step": 100 * i, "loss": 1.0, "lr": 1e-3, "progress": progress}),
            ("eval", {"step": 100 * i, "val_loss": 1.0, "bleu": 20.0, "source_gain": g}))]
    assert records(evals(0.01, 0.02)) == ["source_ignored"]
    assert records(evals(0.01, 1.5, 0.03)) == []                         # once is early noise
    assert records(evals(2.0, 2.1)) == []
    assert records(evals(0.01, 0.02, progress=0.1)) == []               # early: the target side is learned first


def test_attention_spread_is_the_scores_standard_deviation():
    scores = torch.tensor([[0.0, 1.0, 2.0, -1e9]])                          # the last key masked
    weights = {"enc": [scores.softmax(-1).masked_fill(scores < -1e8, 0.0)[None, None]]}   # (1, 1, 1, 4)
    assert attention_spread(weights) == pytest.approx(1.0, abs=1e-5)       # std of 0, 1, 2
    assert attention_spread({"enc": [torch.ones(1, 1, 1, 1)]}) == 0.0      # one key: nothing to spread


def records(kind_values):
    symptoms, said = Symptoms(), []
    for kind, values in kind_values:
        said += [name for name, _ in symptoms(kind, values)]
    return said


def test_translations_far_shorter_than_the_references_are_named_at_the_second_validation():
    def evals(*ratios, progress=0.5):
        return [record for i, ratio in enumerate(ratios, 1) for record in (
            ("train", {"step": 100 * i, "loss": 1.0, "lr": 1e-3, "progress": progress}),
            ("eval", {"step": 100 * i, "val_loss": 1.0, "bleu": 5.0, "length_ratio": ratio}))]
    assert records(evals(0.3, 0.4)) == ["translation_length"]
    assert records(evals(0.3, 0.9, 0.4)) == []                           # not twice in a row
    assert records(evals(2.2, 2.2)) == []                               # long: an undertrained model repeats
    assert records(evals(0.3, 0.4, progress=0.1)) == []


def test_a_loss_stuck_near_ln_v_after_the_warm_up_is_named_once():
    ln_v = math.log(15)
    start = [("init", {"step": 0, "loss": 3.0, "ln_v": ln_v})]
    lrs = [0.0, 3e-3, 2.8e-3, 2.5e-3, 2e-3]                                # up, then falling
    learning = [("train", {"step": s, "loss": loss, "lr": lr})
                for s, loss, lr in zip((1, 50, 100, 150, 200), (3.0, 1.9, 1.4, 1.2, 1.0), lrs)]
    stuck = [("train", {"step": s, "loss": 2.4, "lr": lr}) for s, lr in zip((1, 50, 100, 150, 200), lrs)]
    assert records(start + learning) == []
    assert records(start + stuck) == ["loss_stuck"]                         # at step 100, once
    warming = [("train", {"step": s, "loss": 2.4, "lr": s * 1e-5}) for s in (1, 100, 200)]
    assert records(start + warming) == []                                   # still warming up
    assert records(stuck) == []                                             # a resumed run: no step-0 record


def test_a_low_validation_loss_with_a_bleu_near_zero_is_named():
    evals = lambda loss, bleu: [("eval", {"step": 100, "val_loss": loss, "bleu": bleu})]   # noqa: E731
    assert records(evals(0.1, 0.0)) == ["teacher_forcing_leak"]
    assert records(evals(0.1, 99.4)) == []                                  # the toy task solved
    assert records(evals(2.0, 1.0)) == []                                   # early in a run


def step_log(tmp_path, model, overfit=0):
    """The step log with the diagnostics' checks, as train_loop wires them."""
    log = RunLog(str(tmp_path), True)
    return StepLog(log, 0, 0, "cpu", StepChecks(log, model, overfit)), log


def run_at(step, batch_in_epoch=1):
    return types.SimpleNamespace(step=step, epoch=step, batch_in_epoch=batch_in_epoch, minutes=0.0)


def warned(log, jumps: bool = True) -> list[str]:
    """The warnings of a log; jumps: the test skips from step to step, so step_count's are left out."""
    if not os.path.exists(log.path):
        return []
    with open(log.path) as f:
        return [r["name"] for r in map(json.loads, f) if r["kind"] == "warning" and not (jumps and
                                                                                     r["name"] == "step_count")]


OUT = dict(loss=2.0, tokens=10, update="done", gnorm=1.0, gnorm_enc=0.5, gnorm_dec=0.5)


def test_the_step_log_names_kept_gradients_and_weights_that_grow(data, tmp_path):
    model, batch = tiny(data)
    steps, log = step_log(tmp_path, model)
    for step in (1, 50):
        steps.add(run_at(step), 1e-3, OUT, [batch], 0.1)
        steps.write(run_at(step), 0.0, 1e-3, OUT, {})
    assert warned(log) == []                                                # healthy: no gradient, same size
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))   # zero_grad() forgotten
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.6).add_(1e-3)                                          # far too large updates
    steps.add(run_at(100), 1e-3, OUT, [batch], 0.2)
    steps.write(run_at(100), 0.0, 1e-3, OUT, {})
    assert warned(log) == ["gradients_kept", "weights_grow"]
    steps.add(run_at(150), 1e-3, OUT, [batch], 0.3)
    steps.write(run_at(150), 0.0, 1e-3, OUT, {})
    assert warned(log) == ["gradients_kept", "weights_grow"]                # each once


def test_overfit_mode_names_a_batch_that_changes(data, tmp_path):
    batches = TrainBatches(data, 400, 0)
    first, other = batches.next(0, 0)[0], batches.next(0, 1)[0]
    model = tiny(data)[0]
    steps, log = step_log(tmp_path, model, overfit=1)
    for step in range(1, 4):
        steps.add(run_at(step), 1e-3, OUT, [first], 0.1)
    assert warned(log) == []
    steps.add(run_at(4), 1e-3, OUT, [other], 0.1)
    assert warned(log) == ["overfit_batches_change"]
    steps, log = step_log(tmp_path / "b", model)                            # not in overfit mode: batches change
    for step, b in enumerate((first, other), 1):
        steps.add(run_at(step), 1e-3, OUT, [b], 0.1)
    assert warned(log) == []


def test_a_warning_is_a_line_and_a_record(tmp_path, capsys):
    log = RunLog(str(tmp_path), True, watchers=[Symptoms()])
    log.warn("loss_stuck", "the loss has not moved", 7)
    assert capsys.readouterr().out == "warning: the loss has not moved\n"
    with open(log.path) as f:
        assert json.loads(f.read()) == {"kind": "warning", "name": "loss_stuck", "step": 7,
                                        "text": "the loss has not moved"}
    log.record("eval", "eval step 8", step=8, val_loss=0.05, bleu=0.0)      # a record that calls for a warning
    with open(log.path) as f:
        assert [r["kind"] for r in map(json.loads, f)] == ["warning", "eval", "warning"]


def test_a_warning_says_where_the_runs_that_should_agree_first_part(data, monkeypatch):
    """Where a property breaks: the first module whose input differs (made by its caller's plain code)
    or whose output differs for the same input, in the order the calls ran."""
    model, batch = tiny(data)
    attend = MultiHeadAttention.attend
    monkeypatch.setattr(MultiHeadAttention, "attend", lambda self, q, k, v, mask=None, causal=False:
                        attend(self, q, k, v, mask, False))                 # no causal mask
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log)
    assert "it enters first at the input of `decoder.0.self_attn.out_proj`" in log.texts["causal_mask"]
    assert "`decoder.0.self_attn` (MultiHeadAttention)" in log.texts["causal_mask"]
    monkeypatch.undo()
    encode = Transformer.encode
    monkeypatch.setattr(Transformer, "encode", lambda self, src: (encode(self, src)[0], None))   # cross-attention
    log = Warnings()                                                    # gets no source mask
    probe_model(model, batch, sequence_loss, data, log)
    assert "`decoder.0.cross_attn` (MultiHeadAttention)" in log.texts["padding_mask"]
    monkeypatch.undo()
    rnn, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)
    decode_step = type(rnn).decode_step
    monkeypatch.setattr(type(rnn), "decode_step", lambda self, y, memory, cache: decode_step(self, y, memory, None))
    log = Warnings()                                                    # the hidden state not carried
    probe_model(rnn, batch, sequence_loss, data, log)
    assert "they part first in `decoder` (GRU): given the same input, its output differs" in \
        log.texts["decoding_mismatch"]


def test_an_update_far_from_its_weights_size_names_the_module(data):
    model, batch = tiny(data)
    for moved, everyone, named in ((1e-3, 1e-4, []), (0.5, 1e-4, ["update_ratio"]), (3e-7, 1e-4, ["update_ratio"]),
                                   (1e-3, 3e-6, ["update_ratio"])):     # (the last: the whole model hardly moves)
        log = Warnings()
        checks = StepChecks(log, model, peak_lr=2e-3)                   # (a run from scratch, its peak 2e-3)
        checks.at_log_line(1, 0.0)                                      # before step 100: not measured
        target = model.decoder[1].ff.up.weight
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-4)                                            # every parameter moves
        checks.at_log_line(100, 2e-3)                                   # the rate still rising: the warm-up
        assert checks.before is None
        checks.at_log_line(125, 1e-3)                                   # the next update is measured
        with torch.no_grad():
            for p in model.parameters():
                p.add_(everyone) if p is not target else p.mul_(1 + moved)      # (1e-4 of weights ~0.2: fine)
        checks.at_step(types.SimpleNamespace(step=126, epoch=0), [batch])
        assert log.names == named
        if named and everyone < 1e-5:
            assert "the whole model hardly learns" in log.texts["update_ratio"]
        elif named:
            assert "decoder.1.ff.up" in log.texts["update_ratio"] and "encoder" not in log.texts["update_ratio"]
        checks.at_step(types.SimpleNamespace(step=127, epoch=0), [batch])    # once: never measured again
        assert checks.before == []


def test_the_properties_added_after_the_fifth_held_out_set(data, monkeypatch, tmp_path):
    """The positional code is smooth, Adam's settings hold, translate() encodes sources as training
    does, a batch sorted for packing is put back, the weights do not collapse; a probe that raises
    is a warning, not the end of the run."""
    model, batch = tiny(data)
    with torch.no_grad():
        model.positions.copy_(torch.randn_like(model.positions))          # noise, not sinusoids
    assert probe(model, batch, data) == ["position_encoding"]
    model, batch = tiny(data)
    for optimizer in (torch.optim.AdamW(model.parameters(), betas=(0.98, 0.9)),
                      torch.optim.Adam(model.parameters(), weight_decay=0.01)):
        log = Warnings()
        probe_model(model, batch, sequence_loss, data, log, optimizer)
        assert log.names == ["optimizer_settings"]
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, torch.optim.AdamW(model.parameters(), weight_decay=0.1))
    assert log.names == []
    lengths_sorted = decoding.length_sorted_batches

    def without_eos(encoded, pad_id, eos_id, batch_size):                   # no <eos> after the sources
        return lengths_sorted(encoded, pad_id, pad_id, batch_size)
    monkeypatch.setattr(decoding, "length_sorted_batches", without_eos)
    assert probe(model, batch, data) == ["decoding_input"]
    monkeypatch.undo()
    rnn, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)
    encode = type(rnn).encode

    def sorted_encode(self, src):                                        # sorted for packing, never put back
        return encode(self, src[(src != 0).sum(1).argsort(descending=True)])
    monkeypatch.setattr(type(rnn), "encode", sorted_encode)
    assert "batch_dependence" in probe(rnn, batch, data)
    monkeypatch.undo()
    monkeypatch.setattr(type(rnn), "encode", torch.no_grad()(encode))       # the encoder under no_grad
    assert "no_gradient" in probe(rnn, batch, data)                     # (the dependency probe once raised)
    monkeypatch.undo()
    steps, log = step_log(tmp_path, model)
    steps.add(run_at(1), 1e-3, OUT, [batch], 0.1)
    steps.write(run_at(1), 0.0, 1e-3, OUT, {})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)                                                  # collapsed, as L2 inside Adam does
    steps.add(run_at(50), 1e-3, OUT, [batch], 0.2)
    steps.write(run_at(50), 0.0, 1e-3, OUT, {})
    assert warned(log) == ["weights_shrink"]


def test_a_probe_that_raises_is_a_warning_and_the_run_goes_on(data, monkeypatch):
    model, batch = tiny(data)
    monkeypatch.setattr(probes, "attention_spread", lambda weights: 1 / 0)
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log)
    assert log.names == ["probe_failed"] and "attention_as_designed" in log.texts["probe_failed"]
    assert "ZeroDivisionError" in log.texts["probe_failed"] and "12 of 13 hold" in log.said


def test_a_run_of_one_step_is_not_told_its_schedule_is_wrong():
    """A smoke test (--max_iters=1) logs one record, at 100% of the run: its learning rate is the
    warm-up's 0, or the peak without a warm-up; nothing is wrong with either."""
    for warmup, lr in ((0.15, 0.0), (0.0, 1e-3)):
        symptoms = Symptoms(peak_lr=1e-3, warmup_frac=warmup)
        symptoms("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
        assert symptoms("train", {"step": 1, "loss": 2.7, "lr": lr, "progress": 1.0}) == []


def test_a_warning_shows_what_it_saw_and_the_stage_that_failed(data, monkeypatch):
    """The split's ids against the text's encoding, translate() against greedy decoding, the
    optimizer's rate against the schedule's: each warning says what differs, where."""
    model, batch = tiny(data)
    split = type(data.splits["validation"])
    tgt = split.tgt
    monkeypatch.setattr(split, "tgt", lambda self, i: tgt(self, i)[:-1])     # each target read back one short
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log)
    assert "tokenizer_round_trip" in log.names and "the encoding less its last 1" in log.texts["tokenizer_round_trip"]
    monkeypatch.undo()
    translate = decoding.translate
    monkeypatch.setattr(decoding, "translate", lambda *a, **k: translate(*a, **k)[::-1])  # not in input order
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log)
    assert log.names == ["translate_mismatch"] and "another order" in log.texts["translate_mismatch"]
    monkeypatch.undo()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    log = Warnings()
    checks = StepChecks(log, model, 0, optimizer)

    def update():
        sequence_loss(model(batch[0], batch[1]), batch[2], data.tgt_tok.pad_id, 0.0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    update()
    checks.at_log_line(1, 1e-3)
    assert log.names == []
    optimizer.lr = 5e-4                                                 # an attribute the optimizer never reads
    update()
    checks.at_log_line(2, 5e-4)
    assert log.names == ["lr_not_applied"] and "5.00e-04" in log.texts["lr_not_applied"]


def test_a_step_that_optimises_something_else_than_the_loss_is_named(data, monkeypatch):
    """The gradient one train_step hands optimizer.step() is the loss's as defined: silent on the real
    step (smoothing and clipping included), named for targets shifted once more inside the step and
    for gradients cleared before the update."""
    from runtime import setup
    model, batch = tiny(data)
    cfg, rt = dict(train.DEFAULTS, label_smoothing=0.1, grad_clip=0.5), setup("cpu", "float32")

    def names(step_fn):
        log = Warnings()
        probe_model(model, batch, sequence_loss, data, log, None, 0.1,
                    step=lambda micro_batches, kept: step_fn(model, kept, micro_batches, data.tgt_tok.pad_id, cfg, rt))
        return log.names, log.texts
    assert names(train.train_step)[0] == []
    assert all(p.grad is None for p in model.parameters())              # the probe step leaves no gradient

    def shifted_again(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        src, tgt_in, tgt_out = micro_batches[0]
        n_tok = (tgt_out[:, 1:] != pad_id).sum().float()
        loss = sequence_loss(model(src, tgt_in)[:, :-1], tgt_out[:, 1:], pad_id, 0.1) / n_tok
        loss.backward()
        return train.update(model, optimizer, loss.detach(), n_tok, cfg, rt)
    found, texts = names(shifted_again)
    assert found == ["step_gradient"] and "does not follow the loss" in texts["step_gradient"]

    def cleared_first(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        src, tgt_in, tgt_out = micro_batches[0]
        n_tok = (tgt_out != pad_id).sum().float()
        loss = sequence_loss(model(src, tgt_in), tgt_out, pad_id, 0.1) / n_tok
        loss.backward()
        optimizer.zero_grad()                                           # before the update
        return train.update(model, optimizer, loss.detach(), n_tok, cfg, rt)
    found, texts = names(cleared_first)
    assert found == ["step_gradient"] and "no gradient" in texts["step_gradient"]


def test_the_properties_added_after_the_sixth_held_out_set(data, monkeypatch):
    """Weight matrices start at random; translate() stops each sentence at its own length limit; a
    step that leaves one target position out of the loss; a learning rate never negative; an
    optimizer without betas (SGD) is not told about betas."""
    from runtime import setup
    model, batch = tiny(data)
    with torch.no_grad():
        model.decoder[0].ff.up.weight.zero_()
    assert "constant_init" in probe(model, batch, data)
    model, batch = tiny(data)
    limit = decoding.max_target_len
    monkeypatch.setattr(decoding, "max_target_len", lambda n, a=1.5, b=10: limit(2, a, b))   # one limit for all
    found = Warnings()
    probe_model(model, batch, sequence_loss, data, found)
    assert found.names == ["translate_mismatch"] and "its own length limit" in found.texts["translate_mismatch"]
    monkeypatch.undo()
    cfg, rt = dict(train.DEFAULTS, label_smoothing=0.1), setup("cpu", "float32")

    def first_left_out(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        src, tgt_in, tgt_out = micro_batches[0]
        n_tok = (tgt_out != pad_id).sum().float()
        loss = sequence_loss(model(src, tgt_in)[:, 1:], tgt_out[:, 1:], pad_id, 0.1) / n_tok
        loss.backward()
        return train.update(model, optimizer, loss.detach(), n_tok, cfg, rt)
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, torch.optim.SGD(model.parameters(), lr=0.1), 0.1,
                step=lambda micro_batches, kept: first_left_out(model, kept, micro_batches, data.tgt_tok.pad_id, cfg, rt))
    assert log.names == ["step_gradient"]                               # (and not optimizer_settings for SGD)
    symptoms = Symptoms(1e-3, 0.1)
    symptoms("init", {"step": 0, "loss": 3.0, "ln_v": 3.0})
    assert symptoms("train", {"step": 50, "loss": 2.0, "lr": 1e-3, "progress": 0.2}) == []
    assert [name for name, _ in symptoms("train", {"step": 60, "loss": 2.0, "lr": -1e-4, "progress": 0.25})] == \
        ["lr_schedule"]


def test_a_step_counter_that_moves_by_other_than_one_is_named(data, tmp_path):
    model, batch = tiny(data)
    steps, log = step_log(tmp_path, model)
    for step in (1, 2, 3):
        steps.add(run_at(step), 1e-3, OUT, [batch], 0.1)
    assert warned(log, jumps=False) == []
    steps.add(run_at(5), 1e-3, OUT, [batch], 0.1)                       # two counted in one turn
    steps.add(run_at(7), 1e-3, OUT, [batch], 0.1)
    assert warned(log, jumps=False) == ["step_count"]


def test_the_properties_added_after_the_seventh_held_out_set(data, monkeypatch):
    """The first batch holds the split's pairs; a step that calls the model otherwise is named by
    the step's probe, not as a failed probe; a schedule whose peak fell between two log lines is
    not told it never peaked."""
    from runtime import setup
    model, batch = tiny(data)
    src, tgt_in, tgt_out = batch
    reversed_src = src.clone()
    for row in reversed_src:
        n = int((row != data.src_tok.pad_id).sum()) - 1
        row[:n] = row[:n].flip(0)                                       # the source reversed, <eos> kept last
    assert probe(model, (reversed_src, tgt_in, tgt_out), data) == ["batch_pairs"]
    cfg, rt = dict(train.DEFAULTS, label_smoothing=0.1), setup("cpu", "float32")
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, None, 0.1,
                step=lambda micro_batches, kept: train.train_step(
                    model, kept, [(b[1], b[0], b[2]) for b in micro_batches], data.tgt_tok.pad_id, cfg, rt))
    assert log.names == ["step_gradient"]                               # model(tgt_in, src): another loss
    symptoms = Symptoms(3e-3, 0.1)
    symptoms("init", {"step": 0, "loss": 3.0, "ln_v": 3.0})
    for step, lr, progress in ((1, 0.0, 0.017), (50, 3.1e-4, 0.83)):    # 60 steps logged every 50: the peak
        assert symptoms("train", {"step": step, "loss": 2.0, "lr": lr, "progress": progress}) == []  # unseen
    assert [name for name, _ in symptoms("train", {"step": 75, "loss": 2.0, "lr": 1e-5, "progress": 75.0})] == \
        ["lr_schedule"]                                                  # the raw step fed as the progress


def test_a_validation_that_does_not_score_each_translation_against_its_own_reference_is_named(data, monkeypatch):
    model, batch = tiny(data)
    assert probe(model, batch, data) == []                      # a perfect translator scores 100
    evaluate, score = decoding.evaluate, decoding.score
    monkeypatch.setattr(decoding, "score", lambda hyps, refs: score(hyps, refs[1:] + refs[:1]))     # shifted by one
    assert "scoring" in probe(model, batch, data)
    monkeypatch.setattr(decoding, "score", score)

    def against_sources(model, data, *args, **kwargs):          # BLEU against the sources
        val = data.splits["validation"]
        swapped = type(val)([val.src(i) for i in range(len(val))], [val.tgt(i) for i in range(len(val))],
                            val.src_text, val.src_text)
        return evaluate(model, type(data)(data.src_tok, data.tgt_tok, {**data.splits, "validation": swapped},
                                          data.report), *args, **kwargs)
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, evaluate=against_sources)
    assert log.names == ["scoring"] and "sacreBLEU's corpus BLEU of them" in log.texts["scoring"]
    from sacrebleu.metrics import BLEU

    def mean_of_sentences(hyps, refs):                          # not the corpus BLEU
        return {**score(hyps, refs), "bleu": sum(BLEU().sentence_score(h, [r]).score for h, r in zip(hyps, refs))
                / len(hyps)}
    monkeypatch.setattr(decoding, "score", mean_of_sentences)
    assert "scoring" in probe(model, batch, data)


def test_the_properties_added_after_the_eighth_held_out_set(data, monkeypatch):
    """Every module the forward pass calls is the model's; Adam's eps under the gradients' size;
    translate() hands the encoder each source's own encoding; a translation whose first token is
    dropped is told apart from one cut at the end."""
    model, batch = tiny(data)
    plain = [torch.nn.LayerNorm(32)]                            # a layer held in a plain list: not the model's
    encode = Transformer.encode
    monkeypatch.setattr(Transformer, "encode", lambda self, src: (plain[0](encode(self, src)[0]), encode(self, src)[1]))
    found = Warnings()
    probe_model(model, batch, sequence_loss, data, found)
    assert found.names == ["unregistered_modules"] and "LayerNorm" in found.texts["unregistered_modules"]
    monkeypatch.undo()
    for eps, named in ((1e-8, []), (1.0, ["optimizer_settings"])):
        found = Warnings()
        probe_model(model, batch, sequence_loss, data, found, torch.optim.AdamW(model.parameters(), eps=eps))
        assert found.names == named
    assert "eps = 1" in found.texts["optimizer_settings"]
    batches = decoding.length_sorted_batches
    monkeypatch.setattr(decoding, "length_sorted_batches", lambda encoded, *args: batches([e[1:] for e in encoded],
                                                                                           *args))
    found = Warnings()
    probe_model(model, batch, sequence_loss, data, found)
    assert found.names == ["decoding_input"] and "[5, 7] tokens where the sentences' encodings and <eos> have [6, 8]" in \
        found.texts["decoding_input"]
    monkeypatch.undo()
    strip = decoding.strip_special
    monkeypatch.setattr(decoding, "strip_special", lambda ids, eos_id: strip(ids, eos_id)[1:])   # the first dropped
    found = Warnings()
    probe_model(model, batch, sequence_loss, data, found)
    assert found.names == ["translate_mismatch"] and "each an end of the other" in found.texts["translate_mismatch"]


def test_references_too_short_for_bleu_are_not_taken_for_a_scoring_bug(data):
    model, batch = tiny(data)
    val = data.splits["validation"]
    words = type(val)([val.src(i) for i in range(len(val))], [val.tgt(i) for i in range(len(val))], val.src_text,
                      [t.replace(" ", "") for t in val.tgt_text])     # one word each: no 4-gram, BLEU 0 even
    log = Warnings()                                                #   against themselves
    probe_model(model, batch, sequence_loss, type(data)(data.src_tok, data.tgt_tok,
                                                        {**data.splits, "validation": words}, data.report),
                log, evaluate=decoding.evaluate)
    assert "scoring" not in log.names and "tokenizer_round_trip" in log.names     # (its ids are not its text)


def test_a_step_that_reports_an_update_it_never_made_is_named(data):
    from runtime import setup
    model, batch = tiny(data)
    cfg, rt = dict(train.DEFAULTS, grad_clip=1.0), setup("cpu", "float32")

    def skips_large_norms(micro_batches, kept):             # "clipping" by throwing the step away
        src, tgt_in, tgt_out = micro_batches[0]
        n_tok = (tgt_out != data.tgt_tok.pad_id).sum().float()
        loss = sequence_loss(model(src, tgt_in), tgt_out, data.tgt_tok.pad_id, 0.0) / n_tok
        loss.backward()
        if torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]) <= 0.0:
            kept.step()
        kept.zero_grad()
        return {"loss": loss.item(), "update": "done"}
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, step=skips_large_norms)
    assert log.names == ["step_gradient"] and "never calls optimizer.step()" in log.texts["step_gradient"]
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, step=lambda micro_batches, kept: train.train_step(
        model, kept, micro_batches, data.tgt_tok.pad_id, cfg, rt))
    assert log.names == []


@pytest.mark.parametrize("knobs", [dict(arch="transformer"), dict(arch="transformer", pre_norm=False),
                                   dict(arch="rnn", attention="dot", bidirectional=True),
                                   dict(arch="rnn", attention="additive", embed_scale=False),
                                   dict(arch="rnn", attention="none", bottleneck="cho", reverse_source=True),
                                   dict(arch="rnn", attention="none", bottleneck="sutskever")])
def test_every_stage_of_a_healthy_model_is_the_textbooks(data, knobs):
    model, batch = tiny(data, emb_dim=32, hidden_size=32, **knobs)
    model.eval()
    src, tgt_in = batch[0][:4], batch[1][:4]
    wanted = textbook.stages(model, src[0][src[0] != data.src_tok.pad_id], tgt_in[0][tgt_in[0] != data.tgt_tok.pad_id])
    seen = textbook.model_stages(model, src, tgt_in)
    assert len(wanted) >= 4 and {name for name, _ in wanted} - {"logits", "GRU logits"} <= set(seen)   # all compared
    assert textbook.as_the_textbook(model, src, tgt_in, model(src, tgt_in), data) == []


def test_a_model_with_pruned_heads_is_the_textbooks(data):
    model, batch = tiny(data)
    pruned = Transformer(dataclasses.replace(model.cfg, enc_self_heads=[0, 1], dec_cross_heads=[2, 0]),
                         verbose=False).eval()                      # no head left in two attentions
    src, tgt_in = batch[0][:4], batch[1][:4]
    assert textbook.as_the_textbook(pruned, src, tgt_in, pruned(src, tgt_in), data) == []


def test_a_model_that_computes_otherwise_than_the_textbook_says_where(data, monkeypatch):
    """Changes that keep every other property (a consistently different function) are placed by stage."""
    def where(model, batch):
        log = Warnings()
        probe_model(model, batch, sequence_loss, data, log)
        return log.texts.get("textbook_mismatch", "")
    model, batch = tiny(data)
    monkeypatch.setattr(FeedForward, "forward", lambda self, x: self.down(torch.nn.functional.gelu(self.up(x))))
    assert "the encoder layer 1 of" in where(model, batch) and "attention weights agree" in where(model, batch)
    monkeypatch.undo()
    monkeypatch.setattr(Transformer, "embed", lambda self, table, ids, start=0: self.embed_dropout(
        table(ids) * math.sqrt(self.cfg.d_model) + self.positions[start + 1:start + 1 + ids.shape[1]]))
    assert "the source embedding of" in where(model, batch)                  # positions counted from 1
    monkeypatch.undo()
    attend = MultiHeadAttention.attend
    monkeypatch.setattr(MultiHeadAttention, "attend", lambda self, q, k, v, mask=None, causal=False:
                        attend(self, q / math.sqrt(q.shape[-1]), k, v, mask, causal))     # scores / Dh
    assert "the encoder layer 1 self-attention weights of" in where(model, batch)
    monkeypatch.undo()
    model, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)
    encode = Seq2SeqRNN.encode

    def summary_of_the_last_position(self, src):                        # padding included
        memory = encode(self, src)
        summary = memory.outputs[:, -1]
        init = torch.tanh(self.enc_bridge(summary)).view(len(src), self.cfg.n_dec_layer, -1)
        return memory._replace(summary=summary, init=init)
    monkeypatch.setattr(Seq2SeqRNN, "encode", summary_of_the_last_position)
    assert "the summary of" in where(model, batch)


def test_the_properties_added_after_the_tenth_held_out_set(data):
    """Training mode reads its input; the optimizer that steps is the run's; a GRU gate that starts shut."""
    model, batch = tiny(data)                                           # (dropout 0.1: healthy)
    for m in model.modules():
        if "Dropout" in type(m).__name__:                               # (speed.FastDropout too)
            m.p = 1.0                                                   # keep_prob taken for p
    assert probe(model, batch, data) == ["training_mode_blind"]
    model, batch = tiny(data)
    for rebuilt, named in ((False, []), (True, ["optimizer_steps"])):
        optimizer, log = torch.optim.AdamW(model.parameters(), lr=1e-5), Warnings()
        checks = StepChecks(log, model, optimizer=optimizer)
        for step in range(1, 26):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if rebuilt and step > 1 else optimizer
            sequence_loss(model(batch[0], batch[1]), batch[2], data.tgt_tok.pad_id, 0.0).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step in (1, 25):
                checks.at_log_line(step, 1e-5)
        assert [n for n in log.names if n != "lr_not_applied"] == named
    model, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("encoder.bias", "decoder.bias")):
                p.fill_(1.0)                                            # the LSTM forget gate's habit
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log)
    assert "update gates start at z = 0.88" in log.texts.get("target_input_ignored", "")


def test_the_properties_added_after_the_tenth_held_out_sets_second_pass(data):
    """The loop trains in training mode; the model validated is the one trained; the cleaning keeps
    most of the corpus. (The whole model hardly moving: test_an_update_far_from_its_weights_size...)"""
    for dropout, mode, named in ((0.1, "train", []), (0.1, "eval", ["training_mode"]), (0.0, "eval", [])):
        model, _ = tiny(data, dropout=dropout, attn_dropout=dropout, ff_dropout=dropout)
        log = Warnings()
        StepChecks(log, getattr(model, mode)()).at_log_line(1, 0.0)
        assert log.names == named, (dropout, mode)

    def evals(*pairs):                  # (training loss, validation loss) at each validation
        return [record for i, (loss, val) in enumerate(pairs, 1) for record in (
            ("train", {"step": 100 * i, "loss": loss, "lr": 1e-3, "progress": 0.5}),
            ("eval", {"step": 100 * i, "val_loss": val, "bleu": 0.0}))]
    assert records(evals((2.0, 1.9), (1.5, 1.9))) == ["validation_unchanged"]
    assert records(evals((2.0, 1.9), (1.5, 1.4), (1.2, 1.1))) == []
    assert records(evals((2.0, 1.9), (2.0, 1.9))) == []                 # (the same step validated twice)
    assert records(evals((3.14, 3.12), (3.13, 3.12))) == []             # (a model that does not train at all)

    from data import Data
    from diagnostics import data_checks
    splits = data.splits
    report = {"train": {"loaded": len(splits["train"]) * 3, "kept": len(splits["train"]), "too_long": 100},
              "validation": {"loaded": len(splits["validation"]), "kept": len(splits["validation"])}}
    found = dict(data_checks(Data(data.src_tok, data.tgt_tok, splits, report)))
    assert list(found) == ["pairs_dropped"] and "100 too_long" in found["pairs_dropped"]
    report["train"]["loaded"] = len(splits["train"]) + 10
    assert data_checks(Data(data.src_tok, data.tgt_tok, splits, report)) == []


def test_a_decoding_step_that_calls_another_module_says_which(data, monkeypatch):
    """decoding_mismatch names the modules teacher-forced decoding calls that the steps never do, and
    those the steps call instead (here the encoder's GRU run as the decoder's); a healthy model's
    steps, which call the projections the forward pass runs stacked, draw nothing."""
    rnn, batch = tiny(data, arch="rnn", attention="dot", emb_dim=32, hidden_size=32)

    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        states, hidden = self.encoder(self.embed(self.tgt_embed, y[:, None]), hidden.transpose(0, 1).contiguous())
        return self.readout(states, self.attend(states, memory))[:, 0], {"hidden": hidden.transpose(0, 1)}
    monkeypatch.setattr(type(rnn), "decode_step", decode_step)
    log = Warnings()
    probe_model(rnn, batch, sequence_loss, data, log)
    assert "decode_step never calls `decoder` (GRU), which teacher-forced decoding calls; decode_step calls " \
        "`encoder` (GRU)" in log.texts["decoding_mismatch"]
    monkeypatch.undo()
    model, batch = tiny(data)
    assert probe(model, batch, data) == []


def test_the_properties_added_after_the_twelfth_held_out_set(data, monkeypatch):
    """A LayerNorm's gain at 0; a step that writes to the weights itself (put back after the probe); a
    validation loss scored against tgt_in; a forward pass that skips model.encode does not break the
    textbook probe."""
    model, batch = tiny(data)
    with torch.no_grad():
        model.encoder[0].res_attn.norm.weight.zero_()
    assert "constant_init" in probe(model, batch, data)
    model, batch = tiny(data)
    update = train.update

    def clip_scales_weights(model, optimizer, *args):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)                                             # p.grad.mul_ meant
        return update(model, optimizer, *args)
    monkeypatch.setattr(train, "update", clip_scales_weights)
    before = [p.detach().clone() for p in model.parameters()]
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, step=train.probe_step(model, data, train.DEFAULTS,
                                                                               train.setup("cpu", "float32")))
    assert "changes the weights of" in log.texts["step_gradient"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))       # put back
    monkeypatch.undo()
    monkeypatch.setattr(decoding, "sequence_loss", lambda logits, tgt_out, pad_id, eps: sequence_loss(
        logits, tgt_out.roll(1, dims=1), pad_id, eps))                  # scored against tgt_in, nearly
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log, evaluate=decoding.evaluate)
    assert "validation_loss" in log.names
    monkeypatch.undo()
    monkeypatch.setattr(Transformer, "forward", lambda self, src, tgt_in: self.decode(
        tgt_in, (self.enc_norm(self.encoder[1](self.encoder[0](self.embed(self.src_embed, src), None), None)), None)))
    assert "probe_failed" not in probe(model, batch, data, textbook=True)


def test_the_properties_added_after_the_thirteenth_held_out_set(data, monkeypatch):
    """One module under two names; a norm of another kind (the textbook does not fail on it); an epoch
    of batches that is not the training split's."""
    model, batch = tiny(data)
    model.decoder[0].cross_attn = model.decoder[0].self_attn
    log = Warnings()
    probe_model(model, batch, sequence_loss, data, log)
    assert "`decoder.0.cross_attn` is `decoder.0.self_attn`" in log.texts["shared_modules"]
    model, batch = tiny(data)
    class BatchNormOverFeatures(torch.nn.BatchNorm1d):
        def forward(self, x):                                           # (B, T, D): statistics per feature
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
    model.encoder[0].res_attn.norm = BatchNormOverFeatures(32)
    assert "probe_failed" not in probe(model, batch, data, textbook=True)
    from diagnostics import an_epoch_of_the_split
    train_rows = len(data.splits["train"])
    assert an_epoch_of_the_split(TrainBatches(data, 400, 0), data) == []
    half = types.SimpleNamespace(of_epoch=lambda epoch: [list(range(train_rows // 2))], batch_tokens=400)
    assert [n for n, _ in an_epoch_of_the_split(half, data)] == ["epoch_of_the_split"]


def test_the_properties_added_after_the_fourteenth_held_out_set(data, monkeypatch):
    from diagnostics import an_epoch_of_the_split, tokenizer_round_trip
    import batching
    train_rows = len(data.splits["train"])
    whole = types.SimpleNamespace(of_epoch=lambda epoch: [list(range(train_rows))], batch_tokens=400)
    assert [n for n, _ in an_epoch_of_the_split(whole, data)] == ["batch_size"]      # one batch far over the budget
    monkeypatch.setattr(batching, "batch_cost", lambda n, s, t: n * s * t)           # cut far under it
    assert [n for n, _ in an_epoch_of_the_split(TrainBatches(data, 400, 0), data)] == ["batch_size"]
    monkeypatch.undo()
    model, batch = tiny(data)
    assert "init_scale" not in probe(model, batch, data)
    for m in model.modules():                                           # GPT-2's std at a width of 32
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    assert "init_scale" in probe(model, batch, data)
    tok = data.src_tok                                                  # the commonest characters lost
    kept = dict(list(tok.char_to_id.items())[4:])
    monkeypatch.setattr(tok, "char_to_id", kept)
    found = dict(tokenizer_round_trip(data))
    assert "<unk>" in found["tokenizer_round_trip"] and "vocabulary" in found["tokenizer_round_trip"]


def test_the_properties_added_after_the_fifteenth_held_out_set(data, monkeypatch):
    from diagnostics import scores_an_oracle, teacher_forcing_pairs
    src, tgt_in, tgt_out = TrainBatches(data, 400, 0).next(0, 0)[0]
    cut = src.masked_fill(src == data.src_tok.eos_id, data.src_tok.pad_id)             # sources without <eos>
    assert "the source's rows do not end in one <eos>" in dict(teacher_forcing_pairs((cut, tgt_in, tgt_out), data))[
        "target_shift"]
    model, batch = tiny(data)

    def last_pair_only(model, data, batch_tokens, device, amp, n_sentences=0, **kw):    # the loss summed with =
        got = decoding.evaluate(model, data, batch_tokens, device, amp, n_sentences=n_sentences, **kw)
        sp = data.splits["validation"]
        last = dataclasses.replace(data, splits={"validation": type(sp)(*(x[-1:] for x in (
            [sp.src(i) for i in range(len(sp))], [sp.tgt(i) for i in range(len(sp))], sp.src_text, sp.tgt_text)))})
        tokens = [len(sp.tgt(i)) + 1 for i in range(len(sp))]
        got["loss"] = decoding.evaluate(model, last, batch_tokens, device, amp)["loss"] * tokens[-1] / sum(tokens)
        return got
    assert [n for n, _ in scores_an_oracle(model.eval(), data, decoding.evaluate, "cpu")] == []
    assert [n for n, _ in scores_an_oracle(model, data, last_pair_only, "cpu")] == ["validation_loss"]
    kept = {}                                   # decoding's memory kept on the module, once per batch size
    cross = MultiHeadAttention.cross_attention

    def cross_attention(self, y, memory, mask, cache=None):
        if cache is not None and kept.get(id(self), (None,))[0] != memory.shape[0]:
            kept[id(self)] = (memory.shape[0], memory)
        return cross(self, y, kept[id(self)][1] if cache is not None else memory, mask, cache)
    monkeypatch.setattr(MultiHeadAttention, "cross_attention", cross_attention)
    model, batch = tiny(data)
    assert "hidden_state" in probe(model, batch, data)
    rates = {s: (1e-3 * s / 30 if s < 30 else 1e-5 + 1e-3 * 0.5 * (1 + math.cos(math.pi * min(1, (s - 30) / 30))))
             for s in range(25, 300, 25)}                                      # the decay's clock over w, not 1 - w
    flat = Symptoms(peak_lr=1e-3, warmup_frac=0.1)
    flat("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
    found = [n for s, lr in rates.items() for n, _ in flat("train", {"step": s, "loss": 1.0, "lr": lr,
                                                                       "progress": s / 300})]
    assert found == ["lr_schedule"]
    for decay in ("cosine", "exp", "rsqrt"):                                  # the schedules train.py offers
        cfg = dict(train.DEFAULTS, learning_rate=1e-3, min_lr=1e-6, warmup_frac=0.02, decay=decay)
        healthy = Symptoms(peak_lr=1e-3, warmup_frac=0.02)
        healthy("init", {"step": 0, "loss": 2.7, "ln_v": 2.7})
        assert not any(healthy("train", {"step": s, "loss": 1.0, "lr": train.lr_at(s / 1000, cfg),
                                         "progress": s / 1000}) for s in range(10, 1001, 10)), decay
