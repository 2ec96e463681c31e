"""
Where two runs of a model that must agree part (the probes' comparisons: decode_step against the
forward pass, a prediction against the same with its future, its padding or its batch changed, a
sentence alone against its batch): both run again with a forward hook on every submodule, and the
first call whose input agrees and whose output differs names the module; a difference that
arises between two modules' calls is placed in the plain code of their caller. differ() is the
comparison every probe uses. Leaves out: what a bug is (probes.py and diagnostics.py warn).
"""

import collections
import itertools

import torch


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors (of logits, of encoder outputs) differ by more than float rounding: 0.1% of
    their spread (standard deviation), which fp32 rounding stays far under. Their spread, not their
    size: an untrained GRU's logits spread 0.04 around their mean, a real change is small as well."""
    a, b = a.float(), b.float()
    if a.numel() < 2:                       # (nothing, or one number, to compare: no spread)
        return a.numel() == 1 and (a - b).abs().item() > 1e-3 * a.abs().item() + 1e-6
    return (a - b).abs().max().item() > 1e-3 * a.std().item() + 1e-6


def where_they_part(model, run_a, run_b, pick) -> str:
    """Where two runs of the model that should agree first part, as a clause for a warning ('' when no
    module shows it): forward hooks on every submodule keep each call's first input and output
    tensors; pick(a, b) cuts from a pair of them (the same module's k-th call in each run) the parts
    that should be equal, or gives None (not comparable). Going through the calls in the order they
    ran: a module whose input agrees and whose output differs computes something else itself; a
    module whose input differs while every call before it agrees gets it from the plain code (no
    module) of the module that calls it, run between the two."""
    def record(run) -> tuple[dict, collections.Counter]:
        """{(module name, k): [start, first input, end, first output]} of its k-th call; calls per name."""
        calls, count, clock, hooks = {}, collections.Counter(), itertools.count(), []
        for name, module in model.named_modules():
            if not name:
                continue
            def pre(m, args, name=name):
                calls[(name, count[name])] = [next(clock), tensor_in(args), None, None]
                count[name] += 1
            def post(m, args, out, name=name):
                out = out if isinstance(out, tuple) else (out,)
                calls[(name, count[name] - 1)][2:] = [next(clock), tensor_in(out)]
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        return calls, count
    (a, a_count), (b, b_count) = record(run_a), record(run_b)
    keys = [k for k in a if k in b and a_count[k[0]] == b_count[k[0]]]
    events = sorted([(a[k][0], 1, k) for k in keys] + [(a[k][2], 3, k) for k in keys if a[k][2] is not None])
    modules, agreed, code = dict(model.named_modules()), "the model's input", ""

    def owner(name: str) -> str:                                # the module whose code calls this one
        name = name.rsplit(".", 1)[0] if "." in name else ""
        while name and isinstance(modules[name], (torch.nn.ModuleList, torch.nn.Sequential)):
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name
    for _, i, key in events:
        parts = pick(a[key][i], b[key][i]) if a[key][i] is not None and b[key][i] is not None else None
        name, kind = key[0], type(modules[key[0]]).__name__
        if parts is not None and differ(*parts):
            if i == 3:
                return (f"first in `{name}` ({kind}): given the same input, its output differs (it computes with "
                        "something besides its input: a state, a cache, a mask, or over another axis)")
            where = " and ".join(f"`{m}` ({type(modules[m]).__name__})" if m else f"the model ({type(model).__name__})"
                                 for m in dict.fromkeys((code, owner(name))))
            return (f"first at the input of `{name}` ({kind}), while everything before it agrees ({agreed}): "
                    f"the plain code of {where} that runs between them computes it")
        if parts is not None:                   # the code that runs next: this module's own, or its caller's
            agreed, code = f"`{name}`'s {'output' if i == 3 else 'input'}", owner(name) if i == 3 else name
    return ""


def leak_parts(model, src, tgt_in, b: int, t: int, leak: str, pad_id: int) -> str:
    """Where a leak the dependency probe found enters (where_they_part): row b's forward pass against
    one where what it must not read is changed: 'future' its target inputs after t, 'padding' the
    embeddings of its source padding, 'batch' the other rows' tokens. They must agree on row b
    (up to t for the future; at the real source positions)."""
    B, S, T = *src.shape, tgt_in.shape[1]
    real = src[b] != pad_id
    src2, tgt2, hooks = src.clone(), tgt_in.clone(), []
    if leak == "future":
        tgt2[b, t + 1:] = tgt_in[b, t + 1:].roll(1)
    elif leak == "batch":
        others = torch.arange(B, device=src.device) != b
        src2[others], tgt2[others] = src[others].roll(1, 1), tgt_in[others].roll(1, 1)
    else:
        def noise(module, args, out):                           # the first call: the source's embeddings
            hooks.pop().remove()
            changed = (src == pad_id) & (torch.arange(B, device=src.device) == b)[:, None]       # (B, S)
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
            return out + noise * changed[:, :, None]
        hooks.append(model.src_embed.register_forward_hook(noise))

    def pick(x, y):
        if x.shape != y.shape or x.dim() < 2 or x.shape[0] != B:
            return None
        if leak == "future":
            return (x[b, :t + 1], y[b, :t + 1]) if x.shape[1] == T else None
        if leak == "padding":       # (B, S, ...) at the real positions (if S = T, the decoder's some of its)
            return (x[b, real], y[b, real]) if x.shape[1] == S else (x[b], y[b]) if x.shape[1] == T else None
        return x[b], y[b]
    try:
        return where_they_part(model, lambda: model(src, tgt_in), lambda: model(src2, tgt2), pick)
    finally:
        for h in hooks:
            h.remove()


def step_parts(model, src, tgt_in, rows, t: int) -> str:
    """Where decode_step at position t (after steps 0..t-1) and the forward pass part, on the given rows
    (where_they_part): the forward's (B, T, ...) tensors at t against the step's (B, 1, ...) or (B, ...);
    then the modules one calls and the other does not (calls_apart)."""
    memory, cache = model.encode(src), None
    for u in range(t):
        _, cache = model.decode_step(tgt_in[:, u], memory, cache)
    B, T = tgt_in.shape

    def pick(x, y):
        if x.dim() < 2 or x.shape[0] != B or y.shape[0] != B or x.shape[1] != T:
            return None
        if y.dim() == x.dim() and y.shape[1] == 1 and y.shape[2:] == x.shape[2:]:
            return x[rows, t], y[rows, 0]
        return (x[rows, t], y[rows]) if y.shape[1:] == x.shape[2:] else None
    where = where_they_part(model, lambda: model(src, tgt_in),
                            lambda: model.decode_step(tgt_in[:, t], memory, cache), pick)
    calls = calls_apart(model, src, tgt_in, memory, t)
    return "; ".join(part for part in ("they part " + where if where else "", calls) if part)


def calls_apart(model, src, tgt_in, memory, t: int) -> str:
    """The modules teacher-forced decoding (model.decode) calls that decoding steps 0..t never call,
    and those of the forward pass that the steps call and teacher-forced decoding does not, as a
    clause ('' when none). memory: model.encode(src)'s."""
    modules = dict(model.named_modules())

    def steps():
        cache = None
        for u in range(t + 1):
            _, cache = model.decode_step(tgt_in[:, u], memory, cache)

    def named(names: list[str]) -> str:
        return " and ".join(f"`{m}` ({type(modules[m]).__name__})" for m in names[:3])
    wanted = modules_called(model, lambda: model.decode(tgt_in, memory))
    got, forward = modules_called(model, steps), modules_called(model, lambda: model(src, tgt_in))
    missing = outermost([m for m in wanted if m not in got])
    extra = outermost([m for m in got if m not in wanted and m in forward])     # (the encoder's, say)
    return "; ".join(part for part in (
        f"decode_step never calls {named(missing)}, which teacher-forced decoding calls" if missing else "",
        f"decode_step calls {named(extra)}, which teacher-forced decoding does not" if extra else "") if part)


def modules_called(model, run) -> list[str]:
    """The names of the model's modules with parameters that run() calls, in the order of their first call."""
    called, hooks = {}, []
    for name, module in model.named_modules():
        if name and next(module.parameters(), None) is not None:
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: called.setdefault(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return list(called)


def outermost(names: list[str]) -> list[str]:
    """The names not inside another of them: ['decoder.1'] of ['decoder.1', 'decoder.1.ff']."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def module_names(names: list[str], most: int = 4) -> str:
    """'encoder.0.ff, decoder.1.cross_attn and 3 more': the modules of some parameter names."""
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    return ", ".join(modules[:most]) + (f" and {len(modules) - most} more" if len(modules) > most else "")


def tensor_in(values) -> torch.Tensor | None:
    """The first of a call's arguments (or outputs) if it is a tensor, detached."""
    return values[0].detach() if values and isinstance(values[0], torch.Tensor) else None
