#!/usr/bin/env bash
# Builds Helm (a Go module) at a pinned version into .cache/helm/<version>/helm and prints its path.
# The Go caches live beside it, so a second run is instant; the chart tests call this.
set -euo pipefail
cd "$(dirname "$0")/.."

version=v4.3.2
root=$PWD/.cache/helm
bin=$root/$version/helm
if [[ -x $bin ]]; then
  echo "$bin"
  exit 0
fi
go=$(command -v go || echo /usr/local/go/bin/go)
if [[ ! -x $go ]]; then
  echo "[dev] Go is needed to build Helm $version (go not on PATH, nor /usr/local/go/bin/go)" >&2
  exit 1
fi
echo "[dev] building Helm $version with $($go version | cut -d' ' -f3) (a few minutes, once)" >&2
mkdir -p "$root/$version"
export GOPATH=$root/gopath GOMODCACHE=$root/gopath/pkg/mod GOCACHE=$root/gocache
# -modcacherw: the module cache stays deletable by `rm -rf .cache` (Go makes it read-only otherwise).
export GOBIN=$root/$version.partial CGO_ENABLED=0 GOFLAGS="-buildvcs=false -modcacherw"
rm -rf "$GOBIN"
# As Helm's own Makefile stamps a release, so `helm version` names it.
"$go" install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
  "helm.sh/helm/v4/cmd/helm@$version" >&2
mv "$GOBIN/helm" "$bin"
rmdir "$GOBIN"
echo "$bin"
