# registry-gateway: build with `docker build -t registry-gateway .`, run with compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/registry-gateway
COPY setup.cfg pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install '.[speed]' \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway

USER 10001:10001
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_UPSTREAM=http://registry:5000 \
    GATEWAY_HTPASSWD=/etc/registry-gateway/htpasswd
EXPOSE 8080

# The gateway answers an anonymous /v2/ with its own 401 without asking the registry:
# any answer from it means the process is up and serving.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import http.client as h; c = h.HTTPConnection('127.0.0.1', 8080, timeout=4); c.request('GET', '/v2/'); raise SystemExit(c.getresponse().status != 401)"]

ENTRYPOINT ["registry-gateway"]
CMD ["serve"]
