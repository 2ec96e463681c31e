"""tools/bugs.py, the gallery of classic bugs: every bug named by the diagnostic it declares, the
clean run by none (the whole gallery: slow), and the verdict it draws from a run's log.jsonl."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bugs  # noqa: E402


def write_log(folder, *records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_a_run_is_named_by_its_own_diagnostic_and_the_clean_run_by_none(tmp_path):
    train = {"kind": "train", "step": 1, "loss": 2.5}
    kept = {"kind": "warning", "name": "gradients_kept", "step": 1, "text": "step 1: the parameters still hold "
            "gradients after the update: backward() adds to them. Call optimizer.zero_grad()."}
    spike = {"kind": "warning", "name": "loss_spike", "step": 60, "text": "loss spike at step 60"}
    write_log(tmp_path / "a", train, kept)
    write_log(tmp_path / "b", train, spike)
    named = bugs.outcome(bugs.BY_NAME["no_zero_grad"], str(tmp_path / "a"), 0, 1.0)
    other = bugs.outcome(bugs.BY_NAME["no_zero_grad"], str(tmp_path / "b"), 0, 1.0)
    flagged = bugs.outcome(bugs.BY_NAME["clean"], str(tmp_path / "b"), 0, 1.0)
    clean = bugs.outcome(bugs.BY_NAME["clean"], str(tmp_path / "c"), 0, 1.0)     # (no log at all)
    assert [o["named"] for o in (named, other, flagged, clean)] == [True, False, False, True]
    rows = bugs.table([named, other, flagged])
    assert '`gradients_kept`: "warning: step 1: the parameters still hold gradients after the update: ' in rows[2]
    assert "**not named** (expected `gradients_kept`)" in rows[3] and "`loss_spike`" in rows[3]
    assert "**flagged**" in rows[4]


def test_every_bug_declares_the_diagnostic_that_names_it():
    assert [b.name for b in bugs.GALLERY if not b.named_by] == ["clean", "clean_gru"]
    assert all(b.held_out for b in bugs.HELD_OUT) and not any(b.held_out for b in bugs.GALLERY)
    assert all(b.inject is not None or b.knobs for b in bugs.GALLERY if b.named_by)   # each run differs


@pytest.mark.slow      # 13 toy runs, ~2-4 minutes
def test_the_gallery_names_every_bug_and_flags_nothing_in_the_clean_run(tmp_path):
    names = ",".join(b.name for b in bugs.GALLERY)                                     # (the held-out set: docs)
    out = subprocess.run([sys.executable, "tools/bugs.py", f"--out_dir={tmp_path}", f"--bugs={names}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]     # after the header
    assert [row.split(" | ")[0][2:] for row in rows] == [b.name for b in bugs.GALLERY]
    assert "| clean |" in rows[0] and "nothing fired" in rows[0] and "nothing fired" in rows[1]   # clean, clean_gru
    for row, bug in zip(rows[2:], bugs.GALLERY[2:]):
        assert f"`{bug.named_by}`: \"warning: " in row, row
    assert os.path.exists(tmp_path / "bugs.png")
