"""The one config object: YAML (safe_load) + ``--set key=value`` overrides, strictly validated."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from poisonguard.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_DEPTH = 64  # nested lists and mappings: the config needs 4; PyYAML's time grows with the square of depth
ParamValue = bool | int | float | str | None


def _registry() -> dict:
    """The detector registry: the names and parameters the config accepts, in default order."""
    from poisonguard.detectors import DETECTORS

    return DETECTORS


def _defaults() -> tuple[str, ...]:
    from poisonguard.detectors import DEFAULT_DETECTORS

    return DEFAULT_DETECTORS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)  # every number finite


class Columns(_Strict):
    id: str = "id"
    label: str = "label"
    embedding: str = "embedding"


class EmbeddingConfig(_Strict):
    source: Literal["column", "model", "proxy"] = "column"
    dim: int | None = Field(default=None, ge=1, le=16384, description="declared dimension; None = from the data")
    max_abs_value: float = Field(default=1e6, gt=0, description="larger |values| are quarantined")
    features: str | None = None
    features_shape: list[int] | None = None
    model: str | None = None
    architecture: Literal["mlp"] | None = None
    hidden: list[int] = Field(default_factory=lambda: [128, 32], min_length=1)
    layer: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    inference_batch_size: int = Field(default=4096, ge=1)
    proxy_architecture: Literal["auto", "mlp", "cnn"] = Field(
        default="auto", description="auto: a CNN over the inferred or declared features_shape for images and "
                                    "sequences, the MLP for tables (chosen on the development families); mlp; cnn")
    proxy_epochs: int = Field(default=300, ge=1, le=100000, description="at most this many epochs")
    proxy_batch_size: int = Field(default=256, ge=1)
    proxy_target_loss: float = Field(default=0.01, ge=0, description="converged: the epoch's mean loss is below it")
    proxy_patience: int = Field(default=5, ge=1, description="converged: no 1% better epoch in this many")
    proxy_stop: Literal["auto", "train_loss", "held_out"] = Field(
        default="auto", description="train_loss: to near-zero training loss; held_out: early stopping on the "
                                    "held-out rows, or at near-zero training loss if that comes first; auto: "
                                    "held_out for images and sequences, train_loss for tables")
    proxy_holdout: float = Field(default=0.1, ge=0, lt=0.5, description="share of the sample held out to measure fit")
    proxy_max_rows: int = Field(default=50000, ge=10)
    proxy_lr: float = Field(default=3e-3, gt=0)
    proxy_threads: int = Field(default=1, ge=1, le=1024,
                               description="torch threads training the proxy: 1 trains the same weights on any machine; "
                                           "more trains faster, but the weights then depend on the thread count")
    proxy_exclusion: bool = Field(
        default=True, description="proxy mode, images and sequences: a group a detector splits off short of its "
                                  "separation bar is left out of a second proxy's training, and flagged where the rows "
                                  "the first proxy learnt go to several other classes (exclusionary reclassification, "
                                  "poisonguard.core.exclusion); false saves the second training")
    spill: bool = Field(default=True, description="model/proxy mode: keep pass 1's embeddings for pass 2 (disk) "
                                                  "instead of running the model again")
    label_view: Literal["auto", "embedding", "features"] = Field(
        default="auto", description="what confident learning reads: features (the feature column itself), embedding, "
                                    "or auto: features for a proxy on a table (a proxy trained on the labels "
                                    "memorises flipped ones), the embedding otherwise")

    @model_validator(mode="after")
    def _sources(self):
        if self.source in ("model", "proxy") and not self.features:
            raise ValueError(f"embedding.source {self.source} needs embedding.features (the feature column)")
        if self.features_shape is not None and not (1 <= len(self.features_shape) <= 3
                                                    and all(side >= 1 for side in self.features_shape)):
            raise ValueError("embedding.features_shape is [length], [channels, length] or [channels, height, width], "
                             "each at least 1")
        if self.label_view == "features" and self.source == "column":
            raise ValueError("embedding.label_view features needs a feature column (source model or proxy)")
        if self.source == "model" and not self.model:
            raise ValueError("embedding.source model needs embedding.model (a TorchScript or state-dict file)")
        return self


class DetectorConfig(_Strict):
    name: str
    params: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _finite(cls, params):
        bad = next((k for k, v in params.items() if isinstance(v, float) and not math.isfinite(v)), None) \
            if isinstance(params, dict) else None
        if bad is not None:
            raise ValueError(f"{bad} must be a finite number")
        return params

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in _registry():
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(_registry())}")
        return name


class DriftConfig(_Strict):
    max_share_ratio: float = Field(default=2.0, gt=1, description="warn when a class's share changes by this factor")
    max_mean_shift: float = Field(default=0.5, gt=0, description="warn when a class mean moves this many class SDs")


class CanaryConfig(_Strict):
    """The opt-in self-test that measures the detectors' recall on this data (never changes outputs)."""

    enabled: bool = False
    rate: float = Field(default=0.05, gt=0, le=0.5, description="proxy mode: canaries per target class, share of it")
    trigger: Literal["patch", "blend", "both"] = Field(
        default="patch",
        description="proxy mode: the canaries' trigger: patch (a 2x2 patch, a 3-step burst or a few fixed features, "
                    "its own place per target class; Gu et al. 2017), blend (the whole input mixed with a seeded "
                    "random pattern per target class, x' = (1 - blend_alpha) x + blend_alpha p; Chen et al. 2017) "
                    "or both (each run as alone, twice the proxies; the lower recall counts)")
    blend_alpha: float = Field(default=0.2, gt=0, lt=1, description="proxy mode, blend trigger: the pattern's weight")
    triggers_per_proxy: int | None = Field(
        default=None, ge=1, le=1000,
        description="proxy mode: target classes whose canary triggers one proxy learns at once (none: all, one "
                    "training; 1: a proxy per target, one attack each as a real one, a training each)")
    sizes: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1], min_length=1, max_length=10,
                               description="embedding mode: planted cluster sizes as shares of the class")
    distances: list[float] = Field(
        default_factory=lambda: [2.0, 3.95, 8.0], min_length=1, max_length=6,
        description="embedding mode: planted groups' centres from the class mean, in class SDs along their direction "
                    "(3.95: the median of real backdoors on the development families; the grid says how far out an "
                    "attack must sit to be caught)")
    spread: float = Field(default=1.8, gt=0, le=100,
                          description="embedding mode: planted group's covariance over the class's (the same median)")
    max_classes: int = Field(default=20, ge=1, le=1000, description="classes tested (the largest)")
    workers: int = Field(default=1, ge=1, le=256,
                         description="embedding mode: processes refitting the detectors per planted group (the same "
                                     "results, faster on more cores; each holds a copy of the class samples)")
    min_recall: float | None = Field(default=None, ge=0, le=1, description="exit 1 when the measured recall is lower")

    @field_validator("sizes")
    @classmethod
    def _shares(cls, sizes: list[float]) -> list[float]:
        if not all(0 < s <= 0.5 for s in sizes):
            raise ValueError("each size is a share of the class in (0, 0.5]")
        return sorted(sizes)

    @field_validator("distances")
    @classmethod
    def _distances(cls, distances: list[float]) -> list[float]:
        if not all(0 < d <= 100 for d in distances):
            raise ValueError("each distance is in class SDs, in (0, 100]")
        return sorted(set(distances))


class ReportConfig(_Strict):
    image_column: str | None = None
    image_shape: list[int] | None = None
    top_suspects: int = Field(default=20, ge=1)
    max_points_per_class: int = Field(default=1500, ge=10)
    max_classes: int = Field(default=20, ge=1)


class Config(_Strict):
    columns: Columns = Field(default_factory=Columns)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    suite: str | None = None
    detectors: list[DetectorConfig] = Field(
        default_factory=lambda: [DetectorConfig(name=name) for name in _defaults()], min_length=1
    )
    expected_poison_rate: float | None = Field(default=None, gt=0, lt=0.5)
    max_fit_rows_per_class: int = Field(default=5000, ge=10, le=1_000_000)
    max_classes: int = Field(default=1_000_000, ge=1, le=10_000_000, description="more distinct labels is exit 2")
    fail_on: float = Field(default=0.10, ge=0, le=1, description="largest acceptable quarantined share")
    accept_mass_quarantine: bool = Field(default=False, description="apply a detector that flags most classes")
    seed: int = Field(default=0, ge=0, lt=2**32)
    batch_size: int = Field(default=8192, ge=1, le=1_000_000)
    blas_threads: int = Field(default=1, ge=1, le=1024,
                              description="threads BLAS may use in one worker (core.threads: 1 is faster here and "
                                          "independent of the core count)")
    partitioning: Literal["none", "hive"] = Field(
        default="none", description="hive: folder names key=value below the input folder are read as columns "
                                    "(int64 where every value is a canonical integer, else string)")
    engine: Literal["auto", "memory", "beam"] = "auto"
    scoring_device: Literal["cpu", "auto", "cuda"] = Field(
        default="cpu", description="where the detectors score rows: cpu (numpy), cuda (torch on the GPU; exit 2 "
                                   "without one), auto (cuda when there is one)")
    memory_engine_max_rows: int | None = Field(
        default=None, ge=0, description="auto engine: in memory up to this many rows (None: any), Beam above")
    provenance_log: str | None = None
    state: str | None = None
    drift: DriftConfig = Field(default_factory=DriftConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    canaries: CanaryConfig = Field(default_factory=CanaryConfig)

    @model_validator(mode="after")
    def _distinct_columns(self):
        vector = "columns.embedding" if self.embedding.source == "column" else "embedding.features"
        roles = [("columns.id", self.columns.id), ("columns.label", self.columns.label), (vector, self.vector_column)]
        for i, (role, name) in enumerate(roles):
            other = next((r for r, n in roles[i + 1:] if n == name), None)
            if other is not None:
                raise ValueError(f"{role} and {other} name the same column {name!r}")
        return self

    @property
    def vector_column(self) -> str:
        """The column pass 1 reads for embeddings: the embedding itself, or the model's features."""
        return self.columns.embedding if self.embedding.source == "column" else self.embedding.features

    def detector_params(self, det: DetectorConfig) -> dict[str, Any]:
        params = {"random_state": self.seed, "max_fit_rows_per_class": self.max_fit_rows_per_class,
                  "accept_mass_quarantine": self.accept_mass_quarantine}
        if self.expected_poison_rate is not None:
            params["expected_poison_rate"] = self.expected_poison_rate
        params.update(det.params)
        return params


PATH_KEYS = (("suite",), ("provenance_log",), ("state",), ("embedding", "model"))


def validated(data: dict, source: str) -> Config:
    """``data`` as a Config; ConfigError (exit 2) naming the first bad key otherwise."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _location(first["loc"]) or "config"
        raise ConfigError(f"config {source}: {where}: {first['msg']}") from None


def load_config(path: str | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """The config from YAML ``path`` (or ``base``, or defaults), then ``key=value`` overrides.

    Relative paths inside the file resolve against the file's folder; override paths against the
    working folder.
    """
    data: dict[str, Any] = json.loads(base.model_dump_json()) if base is not None else {}
    source = "defaults"
    if path:
        from poisonguard import storage

        remote, uri = storage.is_remote(path), path
        source = path = storage.display(path) if remote else path  # named without credentials or options
        try:
            text = _remote_text(uri) if remote else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", path=path) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=path) from None
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config is larger than {MAX_CONFIG_BYTES} bytes", path=path)
        try:
            _check_aliases(text, path)
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]}", path=path) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("the config must be a YAML mapping", path=path)
        data = _resolve_paths(loaded or {}, uri if remote else Path(path).resolve().parent)
    for item in overrides or []:
        _apply_override(data, item)
    config = validated(data, source)
    names = [d.name for d in config.detectors]
    if len(set(names)) != len(names):
        raise ConfigError(f"config {source}: detectors: each detector may be listed once")
    _check_detector_params(config, source)
    return config


def _location(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _resolve_paths(data: dict, base_dir: Path | str) -> dict:
    """Relative paths against the config's folder: a local folder, or (``str``) the config's URI."""
    from poisonguard import storage

    for keys in PATH_KEYS:
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            node[keys[-1]] = storage.beside(base_dir, value) if isinstance(base_dir, str) else \
                os.path.normpath(base_dir / value)
    return data


def _remote_text(uri: str) -> str:
    """A config on object storage (read whole, and only up to its size limit)."""
    from poisonguard import storage

    data = storage.read_small(uri, MAX_CONFIG_BYTES)
    if data is None:
        raise ConfigError("cannot read config: no such object", path=storage.display(uri))
    return data.decode("utf-8")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes key=value, got {item!r}")
    try:
        _check_aliases(raw, None)
    except ConfigError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    except yaml.YAMLError:
        pass  # not YAML: the text itself, below
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
    node[parts[-1]] = value


def _check_aliases(text: str, path: str) -> None:
    """Refuse YAML alias bombs before anything expands them, and nesting deeper than any config needs
    before the parser spends seconds on it (20,000 nested lists took 50 s to refuse)."""
    aliases = depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        aliases += isinstance(event, yaml.AliasEvent)
        depth += isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)) - \
            isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent))
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"nested more than {MAX_YAML_DEPTH} deep", path=path)
    if aliases > MAX_YAML_ALIASES:
        raise ConfigError(f"{aliases} YAML aliases; at most {MAX_YAML_ALIASES} are allowed", path=path)


def _check_detector_params(config: Config, source: str) -> None:
    """Each detector's params against its typed, bounded signature: exit 2 naming the field."""
    from pydantic import ValidationError as ParamsError

    from poisonguard.detectors import DETECTORS
    from poisonguard.detectors.params import first_error, params_model

    for index, det in enumerate(config.detectors):
        try:
            params_model(DETECTORS[det.name]).model_validate(config.detector_params(det))
        except ParamsError as exc:
            field, message = first_error(exc)
            raise ConfigError(f"config {source}: detectors[{index}].params.{field}: {message}") from None
