# The service's image, as the Helm chart runs it (helm/dask-provisioner: image.repository
# "dask-provisioner", tag the chart's appVersion = this package's version).
#   docker build -t dask-provisioner:0.1.0 .
# Slim, the "server" and "postgres" extras, a non-root user whose uid and gid the chart's
# podSecurityContext names, the data folder the chart mounts its volume on.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY provisioner ./provisioner
COPY clusters ./clusters
COPY api ./api
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server,postgres]'

FROM python:3.11-slim
RUN groupadd --gid 10001 provisioner \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin provisioner \
    && mkdir -p /var/lib/provisioner && chown 10001:10001 /var/lib/provisioner
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'dask-provisioner[server,postgres]' \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/provisioner
EXPOSE 8000
ENTRYPOINT ["provisioner"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/var/lib/provisioner"]
