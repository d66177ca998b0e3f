# aligner on the NGC PyTorch image, which carries CUDA, NCCL, Transformer Engine and Apex.
# Build:  docker build -t aligner .
# Run:    docker run --gpus all --ipc=host --rm -it aligner aligner env
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/aligner
COPY . /opt/aligner
# Keep the image's torch (and its TE / Apex builds): constrain it to the installed version.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt && \
    pip install --no-cache-dir pybind11 && \
    pip install --no-cache-dir --no-build-isolation -c /tmp/constraints.txt -e '.[gpu]' && \
    python -m aligner.cli.main env
ENV PYTHONUNBUFFERED=1
CMD ["aligner", "--help"]
