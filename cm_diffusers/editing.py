"""Zero-shot editing with consistency models (Song et al. 2023, Algorithm 4). Being written."""


class ConsistencyEditingMixin:
    """Editing entry points of `ConsistencyPipeline` (inpaint, colorize, super_resolve, ...)."""
