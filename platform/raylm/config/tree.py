"""The whole config: one section per stage, validated as one tree (a sweep's values as train configs too)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

from raylm.config.base import Section
from raylm.config.data import DataSection, ModelSection, RunSection
from raylm.config.serve import RegistrySection, ServeSection
from raylm.config.train import TrainSection, TuneSection
from raylm.errors import ConfigError


class Config(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    tune: TuneSection = TuneSection()
    registry: RegistrySection = RegistrySection()
    serve: ServeSection = ServeSection()

    @model_validator(mode="after")
    def _tune_values_valid(self) -> Config:
        # Every value a sweep may try must be a valid train config (a batch size must split over the workers), or
        # a trial would die mid-sweep; kept as the field's type (YAML reads `3e-3` as a string).
        for key, spec in self.tune.space.items():
            ((kind, values),) = spec.items()
            if kind not in ("choice", "grid"):
                continue
            leaf = key.split(".", 1)[1]
            checked = []
            for value in values:
                try:
                    train = TrainSection.model_validate({**self.train.model_dump(), leaf: value})
                except ValidationError as err:
                    raise ValueError(f"tune.space.{key}: {value!r} is invalid: {_first_message(err)}") from None
                checked.append(getattr(train, leaf))
            spec[kind] = checked
        return self

    @property
    def model_name(self) -> str:
        return self.registry.name or self.run.name


def _first_message(err: ValidationError) -> str:
    return err.errors()[0]["msg"].removeprefix("Value error, ")


def validate_config(tree: dict[str, Any]) -> Config:
    """Validate a plain dict (from YAML, or crossing into a Ray worker) into a `Config`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def _explain(err: ValidationError) -> str:
    lines = []
    for error in err.errors():
        loc = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_suggest(error['loc'])}")
        elif loc:
            got = error.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"{loc}: {error['msg'].removeprefix('Value error, ')}{shown}")
        else:
            lines.append(error["msg"].removeprefix("Value error, "))
    return "invalid config:\n  " + "\n  ".join(lines)


def _suggest(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    prefix = ".".join(str(part) for part in loc[:-1])
    return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
