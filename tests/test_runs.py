"""tools/runs.py: two tiny runs of train.py that differ in one knob, side by side: the figure, the
table of where each ended, the knob that differs (and not those that do not); runs cut short or
diverged; a folder that is not a run."""
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import TINY, run, train_records
from tools import runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 10-step runs, dropout 0.0 and 0.3, validated at steps 5 and 10 (ckpt.pt and best.pt written);
    side by side, as each runs on one thread."""
    folders = [tmp_path_factory.mktemp("runs") / name for name in ("calm", "noisy")]

    def train(folder, dropout):
        run("train.py", *TINY, "--max_iters=10", "--eval_interval=5", "--eval_sentences=10", f"--dropout={dropout}",
            f"--out_dir={folder}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(train, folders, ("0.0", "0.3")))
    return folders


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """python tools/runs.py ARGS, run in this process (a subprocess would spend 2-3 s importing torch
    again): (exit code, stdout, stderr). The knobs it sets are put back afterwards."""
    for knob in ("out", "x", "labels"):
        monkeypatch.setattr(runs, knob, getattr(runs, knob))
    monkeypatch.setattr(sys, "argv", ["tools/runs.py", *map(str, args)])
    try:
        runs.main_guard(runs.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def table_row(lines, first_cell):
    """The markdown row whose first cell is `first_cell`, as its cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    found = [cells for cells in rows if cells[0] == first_cell]
    assert found, f"no row '{first_cell}' in:\n" + "\n".join(lines)
    return found[0]


def test_two_runs_side_by_side(two_runs, tmp_path, monkeypatch, capsys):
    calm, noisy = two_runs
    png = tmp_path / "runs.png"
    code, out, _ = cli(monkeypatch, capsys, calm, noisy, f"--out={png}")
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.splitlines()
    for name, folder in (("calm", calm), ("noisy", noisy)):
        cells = table_row(lines, name)                 # run | steps | minutes | loss | best BLEU (step) | ...
        assert cells[1] == "10"
        evals = train_records(folder, "eval")
        best = max(evals, key=lambda r: r["bleu"])
        assert cells[4] == f"{best['bleu']:.2f} ({best['step']})"
        assert cells[5] == f"{evals[-1]['val_loss']:.3f}"
    assert table_row(lines, "dropout")[1:] == ["0.0", "0.3"]
    assert not any(line.startswith(("| d_model ", "| max_iters ", "| out_dir ")) for line in lines)
    assert "1 knob differs" in out

    code, out, _ = cli(monkeypatch, capsys, calm, noisy, "--labels=p0,p3", "--x=minutes", f"--out={tmp_path / 'm.png'}")
    assert code == 0 and (tmp_path / "m.png").stat().st_size > 10_000
    assert table_row(out.splitlines(), "knob")[1:] == ["p0", "p3"]
    assert table_row(out.splitlines(), "p3")[1] == "10"


def write_log(folder, records, tail=""):
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_cut_short_and_diverged_runs(tmp_path, monkeypatch, capsys):
    """A run killed before its first validation and checkpoint, in the middle of a line, and one whose
    loss went NaN: plotted as far as they go, '-' or 'nan' where nothing real is known."""
    early, diverged = tmp_path / "early", tmp_path / "diverged"
    train = [{"kind": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3, "gnorm": 1.0, "tok_per_s": 1000.0 * s,
              "minutes": 0.1 * s} for s in (1, 2, 3)]
    write_log(early, [{"kind": "init", "step": 0, "loss": 2.7, "ln_v": 2.6}, *train], tail='{"kind": "train", "st')
    write_log(diverged, [*train, {"kind": "eval", "step": 3, "val_loss": 1.5, "bleu": 5.0},
                         {"kind": "train", "step": 4, "loss": math.nan, "lr": 1e-3, "gnorm": math.inf},
                         {"kind": "eval", "step": 4, "val_loss": math.nan, "bleu": math.nan}])
    read = [runs.read_run(str(early)), runs.read_run(str(diverged))]
    assert len(read[0]["train"]) == 3 and read[0]["eval"] == []
    for x in ("step", "minutes"):
        png = runs.plot_runs([early, diverged], str(tmp_path / f"{x}.png"), x=x)
        assert open(png, "rb").read(4) == b"\x89PNG"
    lines = runs.final_table(read)
    assert table_row(lines, "early") == ["early", "3", "0.3", "1.0000", "-", "-", "2,000"]
    assert table_row(lines, "diverged") == ["diverged", "4", "-", "nan", "5.00 (3)", "nan", "2,000"]
    code, out, _ = cli(monkeypatch, capsys, early, diverged, f"--out={tmp_path / 'e.png'}")
    assert code == 0 and f"early: {early} has no ckpt.pt or best.pt" in out
    assert "fewer than two runs have a checkpoint" in out


def test_differing_knobs():
    configs = {"a": {"lr": 3e-3, "d_model": 64, "out_dir": "x"}, "b": {"lr": 1e-3, "d_model": 64, "out_dir": "y"},
               "c": {"lr": 3e-3, "d_model": 64, "new_knob": 1, "out_dir": "z"}}
    assert runs.differing_knobs(configs) == {"lr": {"a": 3e-3, "b": 1e-3, "c": 3e-3}, "new_knob": {"c": 1}}
    assert runs.differing_knobs({"a": configs["a"], "c": {**configs["a"], "out_dir": "w"}}) == {}


def test_not_a_run_folder(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, tmp_path)
    assert code == 2
    assert err.strip() == f"error: {tmp_path} has no log.jsonl: is it a run folder of train.py?"
    code, _, err = cli(monkeypatch, capsys, tmp_path / "gone")
    assert code == 2 and "does not exist" in err


def test_help(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "-h")
    assert code == 0 and "python tools/runs.py out/" in out and "x = 'step'" in out
