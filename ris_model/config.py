"""Run configuration: frozen dataclasses per component, loaded from TOML with dotted overrides.

Every default is declared once, on its field. Validation lives in ``__post_init__`` so that an
invalid configuration cannot be constructed at all, whatever its origin (TOML, ``--set``, code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value, key or file is invalid. The message names the dotted key."""


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r}: {why}")


@dataclass(frozen=True)
class GeometryConfig:
    """Carrier, RIS (uniform planar array) and BS (uniform linear array)."""

    carrier_hz: float = 1.0e9
    n_h: int = 12
    n_v: int = 12
    spacing_wavelengths: float = 0.5
    n_bs: int = 16
    bs_spacing_wavelengths: float = 0.5
    bs_distance_m: float = 20.0
    bs_azimuth_deg: float = 30.0
    fresnel: bool = False

    def __post_init__(self) -> None:
        _check(self.carrier_hz > 0, "geometry.carrier_hz", self.carrier_hz, "must be > 0")
        for k in ("n_h", "n_v", "n_bs"):
            _check(getattr(self, k) >= 1, f"geometry.{k}", getattr(self, k), "must be >= 1")
        _check(self.spacing_wavelengths > 0, "geometry.spacing_wavelengths",
               self.spacing_wavelengths, "must be > 0")
        _check(self.bs_distance_m > 0, "geometry.bs_distance_m", self.bs_distance_m, "must be > 0")

    @property
    def wavelength(self) -> float:
        return 299_792_458.0 / self.carrier_hz

    @property
    def n_ris(self) -> int:
        return self.n_h * self.n_v


@dataclass(frozen=True)
class SceneConfig:
    """Source draws: count, angles (degrees), ranges (metres), powers and SNR."""

    k_max: int = 5
    k_min: int = 1
    phi_deg: tuple[float, float] = (-60.0, 60.0)
    theta_deg: tuple[float, float] = (-30.0, 30.0)
    range_m: tuple[float, float] = (0.5, 10.0)
    min_separation_deg: float = 0.0
    power_spread_db: float = 0.0
    snr_db: tuple[float, float] = (-5.0, 20.0)
    coherent: bool = False

    def __post_init__(self) -> None:
        _check(self.k_max >= 1, "scene.k_max", self.k_max, "must be >= 1 (at least one source slot)")
        _check(1 <= self.k_min <= self.k_max, "scene.k_min", self.k_min, f"must be in [1, k_max={self.k_max}]")
        for name, lo, hi in (("phi_deg", -90, 90), ("theta_deg", -90, 90)):
            a, b = getattr(self, name)
            _check(lo <= a <= b <= hi, f"scene.{name}", (a, b), f"must satisfy {lo} <= low <= high <= {hi}")
        a, b = self.range_m
        _check(0 < a <= b, "scene.range_m", (a, b), "ranges must be positive with low <= high")
        a, b = self.snr_db
        _check(a <= b, "scene.snr_db", (a, b), "low must be <= high (bounds reversed?)")
        _check(self.min_separation_deg >= 0, "scene.min_separation_deg", self.min_separation_deg, "must be >= 0")
        _check(self.power_spread_db >= 0, "scene.power_spread_db", self.power_spread_db, "must be >= 0")


@dataclass(frozen=True)
class ChannelConfig:
    """BS-RIS channel and RIS configurations (codes)."""

    rician_k: float = 10.0
    per_sample: bool = False
    snapshots: int = 16
    codebook_grid: tuple[int, int] = (8, 8)
    phase_bits: int = 0
    backproj_eps: float = 1.0e-3

    def __post_init__(self) -> None:
        _check(self.rician_k >= 0, "channel.rician_k", self.rician_k, "must be >= 0")
        _check(self.snapshots >= 1, "channel.snapshots", self.snapshots, "must be >= 1")
        _check(self.phase_bits >= 0, "channel.phase_bits", self.phase_bits, "0 (continuous) or a bit count")
        gx, gy = self.codebook_grid
        _check(gx >= 1 and gy >= 1, "channel.codebook_grid", self.codebook_grid, "must be positive")
        _check(self.backproj_eps > 0, "channel.backproj_eps", self.backproj_eps, "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    batch_size: int = 16
    n_val: int = 64
    n_test: int = 128
    dtype: Literal["float32", "float64"] = "float32"

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        _check(self.n_val >= 0 and self.n_test >= 0, "data.n_val/n_test", (self.n_val, self.n_test), "must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    factor_hidden: int = 512
    factor_head: Literal["steering", "direct"] = "steering"
    position_head: Literal["spectral", "regress"] = "spectral"
    readout_grid: tuple[int, int, int] = (32, 16, 6)
    readout_temperature: float = 5.0
    readout_suppression_deg: float = 4.0
    readout_init: Literal["music", "bartlett"] = "music"
    greedy_k_features: bool = True
    code_dim: int = 32
    beam_grid: tuple[int, int, int] = (12, 6, 3)
    range_spread: float = 0.5

    def __post_init__(self) -> None:
        _check(self.d_model >= 1 and self.n_layers >= 1, "model.d_model/n_layers",
               (self.d_model, self.n_layers), "must be >= 1")
        _check(self.d_model % self.n_heads == 0, "model.n_heads", self.n_heads,
               f"must divide model.d_model={self.d_model}")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(self.factor_hidden >= 1 and self.code_dim >= 1, "model.factor_hidden/code_dim",
               (self.factor_hidden, self.code_dim), "must be >= 1")
        g = self.beam_grid
        _check(all(v >= 1 for v in g) or all(v == 0 for v in g), "model.beam_grid", g,
               "three positive cell counts (phi, theta, r), or [0, 0, 0] to disable the beam feature")
        _check(all(v >= 1 for v in self.readout_grid), "model.readout_grid", self.readout_grid,
               "three positive cell counts (phi, theta, r)")
        _check(self.readout_temperature > 0 and self.readout_suppression_deg > 0,
               "model.readout_temperature/readout_suppression_deg",
               (self.readout_temperature, self.readout_suppression_deg), "must be > 0")
        _check(self.range_spread >= 0, "model.range_spread", self.range_spread, "must be >= 0 (log-range units)")


@dataclass(frozen=True)
class CovarianceConfig:
    """The one covariance builder: R_pred -> R_blend -> optional shrinkage."""

    lambda_range: float = 0.3
    beta: float = 0.3
    shrinkage: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lambda_range >= 0, "covariance.lambda_range", self.lambda_range, "must be >= 0")
        _check(0 <= self.beta <= 1, "covariance.beta", self.beta, "must be in [0, 1]")
        _check(0 <= self.shrinkage < 1, "covariance.shrinkage", self.shrinkage, "must be in [0, 1)")


@dataclass(frozen=True)
class LossConfig:
    covariance: Literal["blend", "pred"] = "blend"
    eigh_backward: Literal["torch", "gap_aware"] = "torch"
    w_cov_nmse: float = 1.0
    w_eigengap: float = 0.1
    eigengap_margin: float = 0.01
    w_subspace: float = 1.0
    w_orthogonality: float = 0.05
    w_cross: float = 0.05
    w_k_ce: float = 0.2
    w_aux: float = 0.2
    aux_huber_delta: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("w_"):
                v = getattr(self, f.name)
                _check(v >= 0 and math.isfinite(v), f"loss.{f.name}", v, "weights must be finite and >= 0")
        _check(self.eigengap_margin >= 0, "loss.eigengap_margin", self.eigengap_margin, "must be >= 0")
        _check(self.aux_huber_delta > 0, "loss.aux_huber_delta", self.aux_huber_delta,
               "must be > 0 (normalised units: a fraction of each coordinate's half-range)")


@dataclass(frozen=True)
class MusicConfig:
    phi_step_deg: float = 0.5
    theta_step_deg: float = 0.5
    n_range: int = 24
    # Non-maximum suppression radius. It must stay below the separation MUSIC is asked to resolve: 3 degrees
    # merged planted pairs 2 degrees apart on R_true; 1 degree (two grid steps) resolves them at 0.6 m
    # (tests/ris_model/test_music.py) and matched all 147 sources of reports/evaluation on R_true, no false alarm.
    nms_deg: float = 1.0
    nms_range_frac: float = 0.25
    refine_iters: int = 60

    def __post_init__(self) -> None:
        _check(self.phi_step_deg > 0 and self.theta_step_deg > 0, "music.phi_step_deg/theta_step_deg",
               (self.phi_step_deg, self.theta_step_deg), "grid steps must be > 0")
        _check(self.n_range >= 1, "music.n_range", self.n_range, "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    lr: float = 1.0e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    amp: bool = False
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    nonfinite: Literal["skip", "stop"] = "skip"
    val_every: int = 50
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", self.steps, "must be >= 0")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr_frac <= 1, "train.min_lr_frac", self.min_lr_frac, "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        _check(self.val_every >= 0, "train.val_every", self.val_every, "must be >= 0 (0 disables)")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every,
               "must be >= 0 (0: only the final checkpoint)")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.threads >= 0, "train.threads", self.threads, "must be >= 0 (0 keeps torch's default)")
        _check(self.device.split(":")[0] in ("cpu", "cuda"), "train.device", self.device,
               "expected 'cpu', 'cuda' or 'cuda:<index>'")


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    description: str = ""
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    covariance: CovarianceConfig = field(default_factory=CovarianceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    music: MusicConfig = field(default_factory=MusicConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- building from dicts

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML/--set value to the field's declared type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, value, f"valid choices: {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)) and len(value) == len(args), key, value,
               f"expected a list of {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        _check(isinstance(value, bool), key, value, "expected true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "expected an integer")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "expected a number")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, value, "expected a string")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r} in {where}; valid keys: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], f"{prefix}{name}"
        if _is_dataclass_type(tp):
            _check(isinstance(value, dict), key, value, "expected a table (section)")
            kwargs[name] = from_dict(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(str(err)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=50")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as gap_aware is taken as a string
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (values parsed as TOML literals)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = _parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Load a RunConfig from a TOML file (or the defaults when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        if not (p := Path(path)).is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; shipped configs are in configs/*.toml")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None
    try:
        return from_dict(RunConfig, apply_overrides(data, overrides))
    except ConfigError as err:  # name the file: the message alone does not say where to look
        raise (ConfigError(f"config file {str(path)!r} (or a --set override): {err}") if path else err) from None


def dumps_toml(cfg: RunConfig) -> str:
    """Serialise a config to TOML (the resolved config written next to every run)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    top, sections = [], []
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict):
            sections.append(f"\n[{k}]\n" + "".join(f"{kk} = {fmt(vv)}\n" for kk, vv in v.items()))
        else:
            top.append(f"{k} = {fmt(v)}\n")
    return "".join(top) + "".join(sections)


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(dumps_toml(cfg).encode()).hexdigest()[:12]


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


__all__ = [
    "ConfigError", "GeometryConfig", "SceneConfig", "ChannelConfig", "DataConfig", "ModelConfig",
    "CovarianceConfig", "LossConfig", "MusicConfig", "TrainConfig", "RunConfig", "from_dict", "to_dict",
    "apply_overrides", "load_config", "dumps_toml", "config_hash", "replace",
]
