"""configurator.py: overrides, and the errors a person sees when a key or value is wrong."""
import pytest

from configurator import ConfigError, configure


def knobs():
    return {"n_layer": 3, "learning_rate": 1e-3, "compile": False, "dataset": "toy:copy", "l0_lambda": 0.05,
            "_private": 1, "helper": print, "A_CONSTANT": "row name"}


def test_command_line_overrides_with_types():
    ns = knobs()
    configure(ns, ["--n_layer=6", "--learning_rate=3", "--compile=true", "--dataset=x/y"])
    assert ns["n_layer"] == 6 and ns["learning_rate"] == 3.0 and isinstance(ns["learning_rate"], float)
    assert ns["compile"] is True and ns["dataset"] == "x/y"


def test_bare_flag_switches_a_boolean_on():
    ns = knobs()
    configure(ns, ["--compile"])
    assert ns["compile"] is True


def test_lambda_alias():
    ns = knobs()
    configure(ns, ["--lambda=0.2"])
    assert ns["l0_lambda"] == 0.2


def test_config_file_then_command_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 4\nlearning_rate = 2e-3\n")
    ns = knobs()
    configure(ns, [str(cfg), "--n_layer=5"])
    assert ns["n_layer"] == 5 and ns["learning_rate"] == 2e-3


def test_unknown_command_line_key_names_close_matches():
    with pytest.raises(ConfigError, match=r"'n_layers'.*Did you mean n_layer"):
        configure(knobs(), ["--n_layers=4"])


def test_misspelled_key_in_config_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("learning_rte = 1e-4\n")
    with pytest.raises(ConfigError, match=r"'learning_rte' \(in .*c.py\).*learning_rate"):
        configure(knobs(), [str(cfg)])


def test_config_file_foreign_keys_ignored_when_not_strict(tmp_path, capsys):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 4\nd_model = 256\n")
    ns = knobs()
    configure(ns, [str(cfg)], strict_file=False)
    assert ns["n_layer"] == 4 and "d_model" not in ns
    assert "d_model" in capsys.readouterr().out


@pytest.mark.parametrize("arg, pattern", [
    ("--n_layer=2.5", r"'n_layer'.*must be int"),
    ("--compile=maybe", r"'compile'.*must be bool"),
    ("--learning_rate=fast", r"'learning_rate'.*must be float"),
    ("--n_layer", r"has no value"),
])
def test_wrong_values(arg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        configure(knobs(), [arg])


def test_wrong_type_in_config_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = '3'\n")
    with pytest.raises(ConfigError, match=r"'n_layer'.*must be int.*got str"):
        configure(knobs(), [str(cfg)])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        configure(knobs(), [str(tmp_path / "nope.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = = 3\n")
    with pytest.raises(ConfigError, match="line 1"):
        configure(knobs(), [str(bad)])


def test_help_lists_knobs_with_defaults_and_comments(tmp_path, capsys):
    src = tmp_path / "script.py"
    src.write_text("n_layer = 3  # layers in encoder and decoder\nlearning_rate = 1e-3  # peak learning rate\n")
    with pytest.raises(SystemExit) as exit_info:
        configure(knobs(), ["-h"], doc_files=(str(src),))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "n_layer = 3" in out and "# layers in encoder and decoder" in out
    assert "learning_rate = 0.001" in out and "peak learning rate" in out
    assert "_private" not in out and "helper" not in out and "A_CONSTANT" not in out
