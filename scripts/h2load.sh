#!/usr/bin/env bash
# The independent check of issue #21: the closed-loop ValidateToken/Health ratio as
# h2load (nghttp2, a load generator this project did not write) measures it, printed next
# to authd-bench's own ratio from the same run.
#
# authd-bench starts a private redis-server and authd (on MariaDB, as for every
# authd-bench run), prepares a live session, checks through a gRPC client that authd
# answers the two request bodies (health SERVING, the token valid: h2load counts HTTP
# statuses and never reads the gRPC status in the trailers), then runs h2load once per
# request, 4 connections x 32 streams, 1 s of warm-up, then the scenario's seconds.
#
#   scripts/h2load.sh                          # 10 s per scenario
#   scripts/h2load.sh --quick                  # 3 s per scenario
#   scripts/h2load.sh --env SESSION_CACHE=on   # the same against an authd with the cache
#   scripts/h2load.sh --h2load-connections 8 --h2load-streams 16 --seconds 20
#
# Extra arguments go to authd-bench (see `cargo run --release -p authd-bench -- --help`).
# Installs h2load (Debian/Ubuntu package nghttp2-client) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v "${H2LOAD:-h2load}" >/dev/null 2>&1; then
  echo "h2load not found: installing nghttp2-client" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get install -y nghttp2-client || { apt-get update && apt-get install -y nghttp2-client; }
  else
    sudo apt-get install -y nghttp2-client || { sudo apt-get update && sudo apt-get install -y nghttp2-client; }
  fi
fi
exec cargo run --release -p authd-bench -- \
  --only health,live,h2load --no-write --h2load "${H2LOAD:-h2load}" "$@"
