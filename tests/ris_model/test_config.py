"""Configuration: bad input names the dotted key in one line, typed overrides, TOML round trip."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ris_model.config import (ConfigError, RunConfig, SceneConfig, apply_overrides, config_hash, dumps_toml,
                              from_dict, load_config)

BAD = [  # (id, TOML text or None, overrides, dotted key expected in the message)
    ("unknown-top-level-key", "colour = 'red'\n", [], "colour"),
    ("unknown-section-key", "[scene]\nkmax = 3\n", [], "scene.kmax"),
    ("unknown-section", "[optimiser]\nlr = 1.0\n", [], "optimiser"),
    ("negative-range", "[scene]\nrange_m = [-1.0, 10.0]\n", [], "scene.range_m"),
    ("range-reversed", "[scene]\nrange_m = [5.0, 1.0]\n", [], "scene.range_m"),
    ("k-max-zero", "[scene]\nk_max = 0\n", [], "scene.k_max"),
    ("snr-bounds-reversed", "[scene]\nsnr_db = [20.0, -5.0]\n", [], "scene.snr_db"),
    ("wrong-type", "[train]\nsteps = 'many'\n", [], "train.steps"),
    ("float-for-int", None, ["train.steps=1.5"], "train.steps"),
    ("bad-choice", None, ["loss.covariance=blnd"], "loss.covariance"),
    ("tuple-length", None, ["scene.phi_deg=[0.0]"], "scene.phi_deg"),
    ("override-unknown-key", None, ["music.nms=1.0"], "music.nms"),
    ("override-without-equals", None, ["train.steps"], "train.steps"),
    ("section-as-value", "scene = 3\n", [], "scene"),
]


@pytest.mark.parametrize("text,overrides,key", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_fails_with_one_line_naming_the_key(tmp_path, text, overrides, key):
    path = None
    if text is not None:
        path = tmp_path / "c.toml"
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    assert "\n" not in msg
    assert key in msg


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*k_max.*snr_db"):
        from_dict(RunConfig, {"scene": {"kmax": 3}})


def test_bad_choice_lists_the_valid_choices():
    with pytest.raises(ConfigError, match="'blend', 'pred'"):
        load_config(None, ["loss.covariance=blnd"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scene\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="scene.k_max"):
        SceneConfig(k_max=0)


def test_overrides_are_typed_by_field():
    cfg = load_config(None, ["train.steps=50", "train.lr=3e-4", "scene.snr_db=[0, 10]", "geometry.fresnel=true",
                             "loss.covariance=pred", "music.n_range=8", "name=quick"])
    assert cfg.train.steps == 50 and type(cfg.train.steps) is int
    assert cfg.train.lr == 3e-4
    assert cfg.scene.snr_db == (0.0, 10.0) and all(type(v) is float for v in cfg.scene.snr_db)
    assert cfg.geometry.fresnel is True
    assert cfg.loss.covariance == "pred"
    assert cfg.music.n_range == 8 and cfg.name == "quick"


def test_int_is_accepted_for_a_float_field_and_converted():
    cfg = load_config(None, ["channel.rician_k=3"])
    assert cfg.channel.rician_k == 3.0 and type(cfg.channel.rician_k) is float


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 10\nlr = 0.1\n")
    cfg = load_config(path, ["train.steps=20"])
    assert (cfg.train.steps, cfg.train.lr) == (20, 0.1)


def test_apply_overrides_does_not_mutate_its_input():
    data = {"train": {"steps": 1}}
    apply_overrides(data, ["train.steps=2"])
    assert data == {"train": {"steps": 1}}


def test_defaults_round_trip_through_toml(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(cfg))
    assert load_config(path) == cfg


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(0, 10_000), lr=st.floats(1e-6, 1.0), snr=st.tuples(st.floats(-20, 0), st.floats(0, 40)),
       fresnel=st.booleans(), name=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12))
def test_round_trip_of_modified_configs(steps, lr, snr, fresnel, name):
    cfg = RunConfig(name=name)
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=steps, lr=lr),
        scene=dataclasses.replace(cfg.scene, snr_db=snr), geometry=dataclasses.replace(cfg.geometry, fresnel=fresnel))
    back = from_dict(RunConfig, tomllib.loads(dumps_toml(cfg)))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)


def test_hash_changes_with_any_field():
    assert config_hash(RunConfig()) != config_hash(load_config(None, ["music.nms_deg=2.0"]))
