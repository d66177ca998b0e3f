# syntax=docker/dockerfile:1
# aligner on the NGC PyTorch image, which carries CUDA, cuDNN, NCCL, Transformer Engine
# and Apex built against its own torch.
#
#   docker build -t aligner .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3 -t aligner .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it aligner aligner env
#
# BASE_IMAGE: any NGC PyTorch release (nvcr.io/nvidia/pytorch:YY.MM-py3). 25.12 ships
# torch 2.10 (pre-release build), CUDA 13.1 and Python 3.12; setup.py accepts torch
# >=2.4,<2.15 and megatron-core >=0.13,<0.17.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/aligner
COPY . /opt/aligner

# Keep the image's torch, Transformer Engine and Apex: pip is constrained to the versions
# already installed, so resolving aligner's requirements (torch, the `gpu` extra's
# transformer-engine) never downloads a replacement. The image's own constraints
# (/etc/pip/constraint.txt, through PIP_CONSTRAINT) still apply on top.
# --no-build-isolation: the C++ packing extension (aligner._C) is built with the image's
# compiler against the pybind11 installed first, not in a throw-away environment.
RUN python - > /tmp/aligner-constraints.txt <<'EOF'
from importlib import metadata
for dist in ("torch", "transformer_engine", "transformer_engine_torch", "apex"):
    try:
        print(f"{dist}=={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        pass
EOF
RUN cat /tmp/aligner-constraints.txt && \
    python -m pip install "pybind11>=2.11" "setuptools>=64" wheel && \
    python -m pip install --no-build-isolation -c /tmp/aligner-constraints.txt -e '.[gpu]'

# Build-time smoke check: the extension is built, torch and megatron-core import, the CLI
# answers. (No GPU during a build: `aligner env` reports what it finds, Transformer Engine
# included, without failing; run it again under `docker run --gpus all`.)
RUN python -c "import aligner._C, torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" && \
    aligner env && \
    aligner --help

CMD ["aligner", "--help"]
