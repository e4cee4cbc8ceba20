# megatron-solo on an NGC PyTorch base: CUDA torch, Transformer Engine and Apex come with the image.
# Build:  docker build -t megatron-solo .       Run: see examples/docker_run.sh
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megatron-solo

# Dependencies first (cached layer). torch / transformer-engine / apex are NOT reinstalled: the base image's builds
# are the ones matched to its CUDA. megatron-core: the newest release in the range setup.py declares.
COPY setup.py pyproject.toml README.md ./
COPY csrc ./csrc
COPY megatron_solo ./megatron_solo
COPY tools ./tools
# Pin the image's own torch (an NGC pre-release build) so pip never swaps it for a PyPI wheel.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
    && PIP_CONSTRAINT=/tmp/keep-torch.txt pip install --no-cache-dir -e ".[test]"

COPY . .
# The C++ core (megatron_solo._C) is built by the editable install above; verify the package imports on this image.
RUN python -c "import megatron_solo._C, megatron.core; print('megatron-core', megatron.core.__version__)"

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
