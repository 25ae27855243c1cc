"""Typed configs for models and runs, loadable from YAML with `key.sub=value` overrides.

Every config is a dataclass; `from_dict` checks field names and types so a typo in a recipe fails
with the field's dotted name instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from unillava.errors import ConfigError

T = TypeVar("T")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    """The vision tower: which kind, where its weights come from, and which features it hands on."""

    type: str = "clip"
    pretrained: str | None = None
    hf_config: dict[str, Any] | None = None
    select_layer: int = -2
    select_feature: str = "patch"
    trainable: bool = False
    image_size: int = 336
    image_mode: str = "pad"
    # None: the tower's own normalisation (CLIP's for CLIP and ConvNeXt, ImageNet's for mobilenet_v2),
    # filled in when the tower is built so that saved configs always record the values used.
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"


@dataclass
class LLMConfig:
    """The causal LM: a local transformers directory, the embedded default's name, or a config dict."""

    pretrained: str | None = "smollm2-135m-instruct"
    hf_config: dict[str, Any] | None = None
    tokenizer: str | None = None


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str = "auto"
    system_prompt: str | None = None
    image_token: str = "<image>"
    max_length: int = 2048


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where YAML or the CLI is ambiguous."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types by dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flatten_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys ({"vision": {"extra": {"a": 1}}} -> {"vision.extra.a": 1}), so a
    recipe may write either form (a CLI `model_overrides.vision.extra.a=1` nests) and mapping-valued
    fields such as `vision.extra` are updated key by key, not replaced."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_overrides(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_override_keys(cls: type, overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The flattened `overrides` after checking every dotted key names a field of dataclass `cls` (keys
    below a mapping-valued field such as `vision.extra` are free); a bad key names `where` and the key."""
    flat = flatten_overrides(overrides)
    for key in flat:
        parts = key.split(".")
        node: Any = cls
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                break
            names = [f.name for f in dataclasses.fields(node)]
            owner = ".".join(parts[:i]) or "the config"
            if part not in names:
                raise ConfigError(
                    f"{where}: unknown key {key!r} ({owner} has no field {part!r}; known: {', '.join(names)})"
                )
            tp = typing.get_type_hints(node)[part]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
                tp = args[0]
            if i < len(parts) - 1 and not (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict):
                raise ConfigError(f"{where}: key {key!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = tp
    return flat


def override_dataclass(obj: T, overrides: Mapping[str, Any], where: str) -> T:
    """A copy of config `obj` with dotted-key `overrides` applied, checked like a config file (a wrong key
    or type names `where`)."""
    flat = check_override_keys(type(obj), overrides, where)
    data = to_dict(obj)
    for key, value in flat.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
        node[last] = value
    return from_dict(type(obj), data, where=where)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(cls, data, where=str(path))
