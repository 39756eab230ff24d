# registry-gateway: build with `docker build -t registry-gateway .`, run with compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Build from a copy that is removed afterwards: the image keeps the installed package only (no
# source tree, build/ or *.egg-info). The group first: `useradd --user-group` would take the next
# free system gid (999) while `USER 10001:10001` runs with gid 10001.
COPY setup.cfg pyproject.toml README.md /tmp/src/
COPY gateway /tmp/src/gateway
RUN pip install '/tmp/src[speed]' \
    && rm -rf /tmp/src \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway

# The image's settings are a config file, so that a file of your own can replace them
# (environment variables would override every file); see config/container.yml.
COPY config/container.yml /opt/registry-gateway/gateway.yml
ENV GATEWAY_CONFIG=/opt/registry-gateway/gateway.yml
USER 10001:10001
EXPOSE 8080 9090

# Probes /healthz on metrics_listen, or the listener itself, wherever the settings put them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["registry-gateway", "healthcheck"]

ENTRYPOINT ["registry-gateway"]
CMD ["serve"]
