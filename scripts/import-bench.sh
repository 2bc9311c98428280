#!/usr/bin/env bash
# Times `authd users import` of N users (default 100000) into the configured users store,
# as BENCHMARKS.md reports it. Every row carries the same $2b$ hash: an import stores
# hashes, it never computes one, so their values do not change its speed.
#
#   DATABASE_URL=mysql://root@127.0.0.1:3306/authd_import JWT_SECRET=... scripts/import-bench.sh
#   SQLITE_PATH=/tmp/import.db scripts/import-bench.sh 100000
set -euo pipefail
rows=${1:-100000}
authd=${AUTHD:-target/release/authd}
file=$(mktemp --suffix=.csv)
trap 'rm -f "$file"' EXIT
hash='$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy'
{
  echo "username,password_hash,roles"
  for ((i = 0; i < rows; i++)); do
    echo "bench_user_$i,$hash,"
  done
} >"$file"
echo "importing $rows rows with $authd"
time "$authd" users import "$file"
echo "again (every user already there):"
time "$authd" users import "$file"
