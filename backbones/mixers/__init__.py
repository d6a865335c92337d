"""Token mixers, one per file; each registers itself with ``@register_mixer``."""
