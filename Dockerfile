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
    GATEWAY_HTPASSWD=/etc/registry-gateway/htpasswd \
    GATEWAY_METRICS_LISTEN=0.0.0.0:9090 \
    GATEWAY_AUDIT_LOG=-
EXPOSE 8080 9090

# /healthz on the metrics address: the process is up and serving (readiness, which also asks the
# registry, is /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]

ENTRYPOINT ["registry-gateway"]
CMD ["serve"]
