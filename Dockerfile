# registry-gateway: build with `docker build -t registry-gateway .`, run with compose.yml.

# Wheels for the package and everything it needs, with both extras: `speed` (uvloop) and `ldap`
# (bonsai, for ldap_auth). bonsai has no binary wheels: it is compiled here against OpenLDAP's
# libldap, so that the image itself carries neither a compiler nor headers.
FROM python:3.11-slim AS wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Python's own headers come with the official image; a Python from Debian needs python3-dev.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libldap-dev libsasl2-dev \
    && { [ -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
         || apt-get install -y --no-install-recommends python3-dev; }
COPY setup.cfg pyproject.toml README.md /tmp/src/
COPY gateway /tmp/src/gateway
RUN pip wheel --wheel-dir /wheels '/tmp/src[speed,ldap]'

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The installed package only (no source tree, build/ or *.egg-info, no wheels left behind), and
# the OpenLDAP client library bonsai was built against (libldap-2.5-0 on bookworm, libldap2 from
# trixie on). The group first: `useradd --user-group` would take the next free system gid (999)
# while `USER 10001:10001` runs with gid 10001. acme_storage's default folder is the gateway's, so
# that a named volume mounted there starts out the gateway's too (docker copies the owner).
COPY --from=wheels /wheels /tmp/wheels
RUN apt-get update \
    && { apt-get install -y --no-install-recommends libldap2 \
         || apt-get install -y --no-install-recommends libldap-2.5-0; } \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-index --find-links /tmp/wheels 'registry-gateway[speed,ldap]' \
    && rm -rf /tmp/wheels \
    && python -c 'import bonsai, uvloop' \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/registry-gateway /var/lib/registry-gateway/acme

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
