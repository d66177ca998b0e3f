"""aligner: a model-parallel toolkit for aligning large language models, on megatron-core."""

__version__ = "0.1.0"
