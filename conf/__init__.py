"""aligner's Hydra configs, installed as the package-data module ``aligner.conf``.

setup.py maps this folder (the repository's top-level ``conf/``) to ``aligner.conf`` so a
wheel carries the configs; Hydra finds them there as ``pkg://aligner.conf``. A source
checkout reads this folder directly (see :func:`aligner.runtime.config_dir`).
"""
