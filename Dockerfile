# aperture-backup: the gRPC backup service for Aperture's PostgreSQL database.
# Build: docker build -t aperture-backup .
# Run:   docker run -e APERTURE_BACKUP_DATABASE_URL_FILE=/run/secrets/database_url \
#                   -e APERTURE_BACKUP_TOKEN_FILE=/run/secrets/aperture_backup_token \
#                   -v "$PWD/secrets:/run/secrets:ro" -v aperture-backups:/backups -p 50051:50051 aperture-backup
# It listens on 0.0.0.0, so it refuses to start without a token (README, "Security").
FROM python:3.12-slim-bookworm

ARG PG_CLIENT_VERSIONS="16 17 18"

# PostgreSQL client tools from the PGDG repository: pg_dump must be at least as new as the server, and an
# archive loads best with the tools of the server's own major version, so several are installed and the
# service picks one per server.
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && install -d /usr/share/postgresql-common/pgdg \
    && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
        https://www.postgresql.org/media/keys/ACCC4CF8.asc \
    && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list \
    && apt-get update \
    && for v in ${PG_CLIENT_VERSIONS}; do pkgs="$pkgs postgresql-client-$v"; done \
    && apt-get install -y --no-install-recommends $pkgs \
    && apt-get purge -y curl gnupg && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 aperture \
    && useradd --system --uid 10001 --gid aperture --home-dir /app --shell /usr/sbin/nologin aperture \
    && install -d -o aperture -g aperture -m 0700 /backups

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY service ./service
COPY clients/python ./clients/python
RUN pip install --no-cache-dir .

USER 10001:10001
ENV APERTURE_BACKUP_DIR=/backups \
    APERTURE_BACKUP_LISTEN=0.0.0.0:50051 \
    PYTHONUNBUFFERED=1
VOLUME ["/backups"]
EXPOSE 50051

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["aperture-backup", "health", "--server", "127.0.0.1:50051"]

ENTRYPOINT ["aperture-backup"]
CMD ["serve"]
