"""aligner.data: public formats, templates, tokenizers, validation, packing, the embedded world."""
from aligner.data.datasets import DataFormatError, load_dataset
from aligner.data.tokenizer import load_tokenizer

__all__ = ["DataFormatError", "load_dataset", "load_tokenizer"]
