"""The job spec: models, loading (presets, overrides, line-numbered errors), the checks of a sweep's
``tune.space``, and JSON Schema. No Ray, no torch."""

from raytune_ft.spec.document import dump_spec, spec_hash, to_yaml
from raytune_ft.spec.loader import (
    absolutize,
    load_document,
    load_spec,
    resolve_preset,
    spec_from_dict,
    validate_document,
)
from raytune_ft.spec.models import (
    ComputeSpec,
    DataSource,
    DataSpec,
    DeepSpeedSpec,
    JobSpec,
    LoraSpec,
    MethodSpec,
    ModelInit,
    ModelSpec,
    QuantizationSpec,
    StorageSpec,
    TrainingSpec,
)


def json_schema() -> dict:
    """JSON Schema of the job spec, for editors (yaml-language-server) and other tools."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "raytune_ft job spec"
    return schema


__all__ = [
    "ComputeSpec", "DataSource", "DataSpec", "DeepSpeedSpec", "JobSpec", "LoraSpec", "MethodSpec",
    "ModelInit", "ModelSpec", "QuantizationSpec", "StorageSpec", "TrainingSpec", "absolutize", "dump_spec",
    "json_schema", "load_document", "load_spec", "resolve_preset", "spec_from_dict", "spec_hash",
    "to_yaml", "validate_document",
]
