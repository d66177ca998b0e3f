"""aligner.data: public formats, templates, tokenizers, validation, prepared datasets, packing,
the embedded world.

The names below load their module on first use (:func:`aligner.runtime.lazy_exports`):
``aligner.data.formats`` imports without torch, so the config checks stay fast.
"""
from aligner.runtime import lazy_exports

_EXPORTS = {"DataFormatError": "datasets", "read_samples": "datasets", "load_dataset": "loading",
            "load_tokenizer": "tokenizer"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
