"""Deprecated: the helpers that lived here have one home each now.

- argparse types: `cm_diffusers.argtypes` (lists: `argtypes.number_list`, or `validation.parse_list`);
- secret redaction: `cm_diffusers.redaction`;
- atomic writes, disk-full errors and output path checks: `cm_diffusers.files`.

Importing a name from here still works and warns once with its new home.
"""

import importlib
import warnings

_NEW_HOMES = {
    "argtypes": ("finite_float", "int_at_least", "float_at_least", "float_in", "positive_int", "non_negative_int",
                 "positive_float", "non_negative_float"),
    "redaction": ("REDACTED", "SECRET_FLAG", "HF_TOKEN_PATTERN", "redact_command", "redact_text", "is_secret_name"),
    "files": ("WRITE_ERRORS", "NO_SPACE_ERRNOS", "format_megabytes", "free_bytes", "write_error", "atomic_output",
              "write_text_atomic", "image_format", "check_image_path", "check_folder_path", "save_image_atomic"),
}
_HOME = {name: module for module, names in _NEW_HOMES.items() for name in names}


def float_list(text: str, flag: str) -> list:
    """Deprecated: `cm_diffusers.validation.parse_list(text, float, flag)`."""
    from .validation import parse_list

    warnings.warn("cm_diffusers.safety.float_list is deprecated; use cm_diffusers.validation.parse_list(text, float, "
                  "field).", FutureWarning, stacklevel=2)
    return parse_list(text, float, flag)


def int_list(text: str, flag: str, low: int = 0) -> list:
    """Deprecated: `cm_diffusers.validation.parse_list(text, int, flag, low)`."""
    from .validation import parse_list

    warnings.warn("cm_diffusers.safety.int_list is deprecated; use cm_diffusers.validation.parse_list(text, int, "
                  "field, low).", FutureWarning, stacklevel=2)
    return parse_list(text, int, flag, low)


def __getattr__(name):
    if name in _HOME:
        module = _HOME[name]
        warnings.warn(f"cm_diffusers.safety.{name} moved to cm_diffusers.{module}.{name}; import it from there (this "
                      "alias will be removed in a future release).", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(f".{module}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
