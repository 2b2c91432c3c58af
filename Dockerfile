# qsmnode in a container: runs as the non-root user `qsmnode`, with volumes for the
# configuration (/etc/qsmnode) and the state (/var/lib/qsmnode: SQLite store, spool, outbox).
#   docker build -t qsmnode .
#   docker run -p 11112:11112 -v qsmnode-state:/var/lib/qsmnode \
#       -v ./my-config:/etc/qsmnode qsmnode
FROM python:3.11-slim-bookworm

RUN useradd --system --home-dir /var/lib/qsmnode --shell /usr/sbin/nologin qsmnode \
    && mkdir -p /etc/qsmnode /var/lib/qsmnode \
    && chown qsmnode:qsmnode /var/lib/qsmnode

WORKDIR /opt/qsmnode
COPY pyproject.toml README.md ./
COPY qsmnode ./qsmnode
RUN pip install --no-cache-dir . && rm -rf /root/.cache
COPY config/qsmnode.toml /etc/qsmnode/qsmnode.toml

ENV QSMNODE_CONFIG=/etc/qsmnode/qsmnode.toml \
    QSMNODE_PATHS_STATE_DIR=/var/lib/qsmnode
VOLUME ["/etc/qsmnode", "/var/lib/qsmnode"]
EXPOSE 11112
USER qsmnode
ENTRYPOINT ["qsmnode"]
CMD ["serve"]
