"""kto-ray: KTO alignment on Ray with a precomputed reference store and DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
