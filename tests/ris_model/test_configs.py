"""The shipped configs: they load, say what they show, keep the 12x12 system, and seed what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from ris_model.config import dumps_toml, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.toml")
                 if not p.name.startswith("space-"))  # space-*.toml are sweep search spaces
SHIPPED = {"quickstart", "default", "seed-misaligned", "seed-nan"}


def test_the_four_configs_ship():
    assert SHIPPED <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_starts_with_what_it_shows(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 30, f"{path.name}: first line must say what the config shows"
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert (cfg.geometry.n_h, cfg.geometry.n_v) == (12, 12)  # the full system, also for the quick run
    assert load_config(path) == cfg and dumps_toml(cfg) == dumps_toml(load_config(path))


def test_seed_misaligned_trains_on_r_pred_and_infers_on_the_blend():
    cfg = load_config(str(CONFIG_DIR / "seed-misaligned.toml"))
    assert cfg.loss.covariance == "pred" and cfg.covariance.beta > 0 and cfg.loss.w_subspace > 0


def test_seed_nan_has_the_ingredients_of_the_fault():
    cfg = load_config(str(CONFIG_DIR / "seed-nan.toml"))
    assert cfg.data.dtype == "float32" and cfg.covariance.shrinkage > 0
    assert cfg.loss.covariance == "blend" and cfg.loss.eigh_backward == "torch" and cfg.loss.w_subspace > 0
    quick = load_config(str(CONFIG_DIR / "quickstart.toml"))
    assert quick.covariance.shrinkage == 0  # what keeps the quickstart finite


def test_quickstart_and_misaligned_differ_only_in_the_seeded_choice():
    quick, mis = load_config(str(CONFIG_DIR / "quickstart.toml")), load_config(str(CONFIG_DIR / "seed-misaligned.toml"))
    assert mis.loss.covariance != quick.loss.covariance
    assert (mis.model, mis.train, mis.data) == (quick.model, quick.train, quick.data)
