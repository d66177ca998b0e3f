"""aligner.data: public formats, templates, tokenizers, validation, prepared datasets, packing, the embedded world."""
from aligner.data.datasets import DataFormatError, read_samples
from aligner.data.loading import load_dataset
from aligner.data.tokenizer import load_tokenizer

__all__ = ["DataFormatError", "load_dataset", "load_tokenizer", "read_samples"]
