"""One optimizer step of train.py, in-process: fp16 loss scaling and bad steps, half precision
on a CPU (a pruned attention, the GRU), one read-back from the device, the step-0 loss check."""
import math

import pytest
import torch

import train
from loss import sequence_loss
from runtime import Runtime
from train import make_optimizer

def tiny_step(dtype, **config):
    """A tiny Transformer (config: more TransformerConfig fields), its optimizer, a run on the CPU in
    `dtype` and one batch."""
    from model_transformer import Transformer, TransformerConfig
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab=12, tgt_vocab=12, pad_id=0, d_model=16, n_head=2, n_enc_layer=1,
                                          n_dec_layer=1, d_ff=32, dropout=0.0, **config), verbose=False)
    src, tgt_in, tgt_out = (torch.randint(3, 12, (4, 5)) for _ in range(3))
    tgt_out[0, 3:] = 0                                                   # some padding
    optimizer = make_optimizer(model, train.DEFAULTS)
    return model, optimizer, started(Runtime("cpu", dtype), optimizer), [(src, tgt_in, tgt_out)]


def started(rt, optimizer, cfg=train.DEFAULTS):
    """rt as train_loop starts it for a new run (in fp16, with a fresh loss scaler)."""
    rt.start(optimizer, cfg, None, train.RunState)
    return rt


def test_fp16_overflow_is_routine_and_a_non_finite_loss_is_a_bad_step(monkeypatch):
    model, optimizer, rt, batches = tiny_step("float16")                # fp16 autocast + GradScaler, on a CPU
    scaler = rt.scaler
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.out_proj.weight.register_hook(lambda g: g * float("inf"))   # the loss stays finite
    out = train.train_step(model, optimizer, batches, 0, train.DEFAULTS, rt)
    hook.remove()
    assert out["update"] == "overflow" and math.isfinite(out["loss"]) and not math.isfinite(out["gnorm"])
    assert scaler.get_scale() == 2.0 ** 15                             # halved from 2^16 ...
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # ... and nothing updated
    monkeypatch.setattr(train, "sequence_loss", lambda *args: sequence_loss(*args) * float("nan"))
    out = train.train_step(model, optimizer, batches, 0, train.DEFAULTS, rt)
    monkeypatch.undo()
    assert out["update"] == "skipped"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    out = train.train_step(model, optimizer, batches, 0, train.DEFAULTS, rt)
    assert out["update"] == "done" and not torch.equal(before["out_proj.weight"], model.out_proj.weight)
    scaler.update(new_scale=0.5)                                       # overflowing when scaled *down*:
    hook = model.out_proj.weight.register_hook(lambda g: g * float("inf"))   # not fp16's range, a bad step
    assert train.train_step(model, optimizer, batches, 0, train.DEFAULTS, rt)["update"] == "skipped"
    hook.remove()
    fp32 = tiny_step("float32")                                         # no loss scaling: infinite gradients are bad
    hook = fp32[0].out_proj.weight.register_hook(lambda g: g * float("inf"))
    assert fp32[2].scaler is None
    assert train.train_step(*fp32[:2], fp32[3], 0, train.DEFAULTS, fp32[2])["update"] == "skipped"
    hook.remove()


# test_cuda.py's half-precision tests, on a CPU: autocast's casts are the same code on either device

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_attention_without_heads_trains_and_decodes_under_autocast_on_a_cpu(dtype):
    from decoding import beam_search, greedy
    model, optimizer, rt, batches = tiny_step(dtype, enc_self_heads=[0], dec_cross_heads=[0], attn_impl="sdpa")
    src = batches[0][0]
    src[1, 3:] = 0                                                       # a padded source
    with rt.amp:
        assert model(src, batches[0][1]).dtype == getattr(torch, dtype)   # it runs in half precision
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = [train.train_step(model, optimizer, batches, 0, train.DEFAULTS, rt) for _ in range(4)]
    # fp16's scaler may overflow while it finds its scale (2^16 at first), but then it must update
    assert all(o["update"] in ("done", "overflow") and math.isfinite(o["loss"]) for o in outs), outs
    assert "done" in [o["update"] for o in outs]
    moved = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
    assert "encoder.0.ff.up.weight" in moved and "decoder.0.cross_attn.out_proj.bias" in moved   # (H = 0: its bias)
    model.eval()
    with rt.amp:
        hyps = greedy(model, src, 1, 2, 0, 9)[0]
        beams = beam_search(model, src, 1, 2, 9, beam=1, alpha=0.0)
    assert [h[0][0] for h in beams] == [[t for t in row if t not in (0, 2)][:len(b[0][0])]
                                       for row, b in zip(hyps.tolist(), beams)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("attention", ["dot", "additive"])
def test_a_gru_with_attention_learns_under_autocast_on_a_cpu(attention, dtype):
    """A few steps on one padded batch: finite losses that fall, the logits in half precision, fp16
    through its loss scaling."""
    from model_rnn import RNNConfig, Seq2SeqRNN
    torch.manual_seed(0)
    model = Seq2SeqRNN(RNNConfig(src_vocab=12, tgt_vocab=12, pad_id=0, emb_dim=16, hidden_size=24, n_enc_layer=1,
                                 n_dec_layer=1, attention=attention, bidirectional=True, dropout=0.0), verbose=False)
    rt, cfg = Runtime("cpu", dtype), {**train.DEFAULTS, "learning_rate": 1e-2}
    src, tgt_in, tgt_out = (torch.randint(3, 12, (4, 6)) for _ in range(3))
    src[1, 3:], tgt_in[0, 4:], tgt_out[0, 4:] = 0, 0, 0                 # padding on both sides
    with rt.amp:
        assert model(src, tgt_in).dtype == getattr(torch, dtype)
    optimizer = make_optimizer(model, cfg)
    started(rt, optimizer, cfg)
    outs = [train.train_step(model, optimizer, [(src, tgt_in, tgt_out)], 0, cfg, rt) for _ in range(8)]
    assert all(math.isfinite(o["loss"]) and o["update"] in ("done", "overflow") for o in outs)
    assert [o["update"] for o in outs].count("done") >= 6 and outs[-1]["loss"] < outs[0]["loss"] - 0.5


def test_a_training_step_reads_values_back_from_the_device_once(monkeypatch):
    model, optimizer, rt, batches = tiny_step("float32")
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, *a, _real=real, _name=name: (reads.append(_name), _real(t, *a))[1])
    out = train.train_step(model, optimizer, batches * 2, 0, train.DEFAULTS, rt)   # two micro-batches
    monkeypatch.undo()
    assert reads == ["tolist"] and out["update"] == "done"
    assert out["tokens"] == 2 * int((batches[0][2] != 0).sum())


def test_initial_loss_check_warns_for_overconfident_first_guesses(tmp_path, capsys):
    import types

    from common import RunLog
    from diagnostics import check_initial_loss
    model, _, rt, batches = tiny_step("float32")
    log = RunLog(str(tmp_path), True)
    data = types.SimpleNamespace(tgt_tok=types.SimpleNamespace(pad_id=0, vocab_size=12))
    check_initial_loss(model, batches[0], sequence_loss, data, log)
    printed = capsys.readouterr().out
    assert "step 0: loss" in printed and "warning" not in printed       # an honest start: no warning
    with torch.no_grad():
        model.tgt_embed.weight.mul_(10)                                   # tied: logits 10x too large
    check_initial_loss(model, batches[0], sequence_loss, data, log)
    assert "warning: the initial loss is +" in capsys.readouterr().out
