"""cm_diffusers: consistency models as first-class diffusers citizens.

Public names are imported lazily so that `import cm_diffusers` stays fast and light.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ConsistencyScheduler": "scheduling_consistency",
    "ConsistencySchedulerOutput": "scheduling_consistency",
    "ConsistencyPipeline": "pipeline_consistency",
    "IdentityTransform": "editing",
    "ColorizationTransform": "editing",
    "SuperResolutionTransform": "editing",
    "LinearTransform": "editing",
    "consistency_edit": "editing",
    "slerp": "editing",
    "load_teacher": "teachers",
    "DDPMDenoiser": "teachers",
    "DDPMEpsDenoiser": "teachers",
    "DDPMVDenoiser": "teachers",
    "DDPMSampleDenoiser": "teachers",
    "EDMDenoiser": "teachers",
    "ConsistencyLoss": "losses",
    "resolve_pretrained": "shipped_models",
    "InceptionFeatureExtractor": "evaluation",
    "frechet_distance": "evaluation",
    "kid": "evaluation",
    "compute_statistics": "evaluation",
    "reference_statistics": "evaluation",
    "sample_ode": "teacher_sampling",
    "sample_teacher": "teacher_sampling",
    "save_model_card": "model_card",
    "push_to_hub": "hub",
    "convert_openai_checkpoint": "convert_openai",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cm_diffusers' has no attribute {name!r}")
