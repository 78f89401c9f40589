# Builds the sidecar and the example echo agent as static binaries on a
# distroless base: docker build -t mailbox-sidecar . ; the echo agent:
# docker build --target echo-agent -t echo-agent .
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# docker build --build-arg VERSION=$(git describe --tags --always) --build-arg COMMIT=$(git rev-parse HEAD) .
# (without them the binary reports the commit Go stamped from .git, if any)
ARG VERSION=dev
ARG COMMIT=
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/mailbox-sidecar ./cmd/mailbox-sidecar && \
    CGO_ENABLED=0 go build -trimpath -o /out/echo-agent ./examples/echo-agent

FROM gcr.io/distroless/static-debian12:nonroot AS echo-agent
COPY --from=build /out/echo-agent /echo-agent
ENTRYPOINT ["/echo-agent"]

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/mailbox-sidecar /mailbox-sidecar
ENTRYPOINT ["/mailbox-sidecar"]
