"""Experiment configs: YAML + dotted overrides, strict validation with one-line messages."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from biograd.errors import ConfigError
from biograd.experiment.config import (
    Config,
    apply_overrides,
    config_keys,
    dump,
    load_config,
    save_config,
    validate,
)


def error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_validate():
    cfg = load_config()
    assert cfg.rule.name == "bp" and cfg.run_rules() == ["bp"] and cfg.seeds == [0]


def test_overrides_are_yaml_values_at_dotted_keys():
    cfg = load_config(
        None,
        ["optim.lr=1e-3", "model.widths=[64, 32]", "rules=[bp,fa]", "data.augment.hflip=true"],
    )
    assert cfg.optim.lr == 1e-3  # "1e-3" is a string in YAML 1.1; the schema makes it a float
    assert cfg.model.kwargs() == {"widths": [64, 32]}
    assert cfg.run_rules() == ["bp", "fa"]
    assert cfg.data.augment.hflip is True


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim: {name: adam, lr: 0.01}\nmodel: {name: mlp, widths: [8]}\n")
    cfg = load_config(path, ["optim.lr=0.5"])
    assert (cfg.epochs, cfg.optim.name, cfg.optim.lr) == (3, "adam", 0.5)
    assert cfg.model.kwargs() == {"widths": [8]}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("data.batchsize=8", "did you mean 'data.batch_size'?"),
        ("batch_size=8", "did you mean 'data.batch_size'?"),
        ("epoch=3", "did you mean 'epochs'?"),
        ("schedule.milestone=[3]", "did you mean 'schedule.milestones'?"),
    ],
)
def test_unknown_key_names_itself_and_the_closest(override, expected):
    assert expected in error([override])


def test_unknown_key_without_a_close_one_lists_the_section():
    message = error(["optim.zzzzzz=1"])
    assert "'optim.zzzzzz'" in message and "momentum" in message and "weight_decay" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("epochs=many", "epochs: Input should be a valid integer"),
        ("optim.lr=fast", "optim.lr: Input should be a valid number"),
        ("optim.name=sgdd", "optim.name: Input should be 'sgd', 'adam' or 'adamw'"),
        ("data.augment.hflip=maybe", "data.augment.hflip: Input should be a valid boolean"),
        ("seeds=3", "seeds: Input should be a valid list"),
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
    ],
)
def test_wrong_type_names_the_expected_one(override, expected):
    message = error([override])
    assert message.startswith(expected), message


def test_unknown_rule_suggests_one():
    assert "unknown rule 'bpp'; did you mean 'bp'?" in error(["rule.name=bpp"])
    assert "unknown rule 'kpp'" in error(["rules=[bp,kpp]"])


def test_bad_device_and_bad_override_form():
    assert "not a torch device" in error(["device=gpu0"])
    assert "key=value" in error(["epochs"])
    assert "is a value, not a section" in error(["epochs=3", "epochs.x=1"])


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["rules=[fa,dfa]", "model.widths=[16]", "schedule.name=cosine"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == dump(cfg)


def test_config_keys_cover_every_section():
    keys = config_keys()
    for key in (
        "data.augment.crop_padding",
        "optim.manhattan",
        "schedule.milestones",
        "rule.layout",
    ):
        assert key in keys


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(min_value=1e-6, max_value=10.0),
    epochs=st.integers(min_value=1, max_value=1000),
    seeds=st.lists(st.integers(min_value=0, max_value=2**31), min_size=1, max_size=4, unique=True),
)
def test_overrides_round_trip_through_text(lr, epochs, seeds):
    cfg = load_config(None, [f"optim.lr={lr!r}", f"epochs={epochs}", f"seeds={seeds}"])
    assert (cfg.optim.lr, cfg.epochs, cfg.seeds) == (lr, epochs, seeds)
    assert validate(dump(cfg)) == cfg


def test_apply_overrides_does_not_touch_its_input():
    base = {"model": {"name": "mlp", "widths": [4]}}
    out = apply_overrides(base, [("model.widths", [8]), "optim.lr=0.2"])
    assert base == {"model": {"name": "mlp", "widths": [4]}}
    assert out == {"model": {"name": "mlp", "widths": [8]}, "optim": {"lr": 0.2}}
    assert isinstance(validate(out), Config)
