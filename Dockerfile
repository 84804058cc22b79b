# The lanes command in a container: a static binary (CGO_ENABLED=0) on a minimal non-root image.
#
#   docker build -t lanes .
#   docker run --rm lanes --version
#
# The image holds no migrations: mount a folder with one subfolder per lane at /migrations, or
# build your own image on top of this one (FROM lanes, COPY db/migrations /migrations).
# The base images are build arguments, so a mirror or a pinned digest can stand in for them:
#   docker build --build-arg GO_IMAGE=mirror.example.com/golang:1.26-bookworm -t lanes .
ARG GO_IMAGE=golang:1.26-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/lanes . \
 && mkdir -p /out/migrations

FROM ${RUNTIME_IMAGE}
# CA certificates for TLS to managed databases (sslmode=verify-full): the builder's bundle, so
# a runtime image without one (scratch) verifies servers too.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/lanes /usr/local/bin/lanes
COPY --from=build --chown=65532:65532 /out/migrations /migrations
# A numeric user, so that Kubernetes' runAsNonRoot can check it: distroless's nonroot.
USER 65532:65532
ENV LANES_MIGRATIONS=/migrations LANES_LOG_FORMAT=json LANES_ADDR=:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/lanes"]
CMD ["serve"]
