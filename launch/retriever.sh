#!/usr/bin/env bash
# Serve a local BM25 retriever (Search-R1 `/retrieve` API) for training and evaluation.
#
#   bash launch/retriever.sh /data/wiki-18.jsonl                 # 127.0.0.1:8000
#   PORT=8001 HOST=0.0.0.0 bash launch/retriever.sh corpus.jsonl  # reachable from other hosts
#
# The corpus is JSONL with {"id", "contents"} rows. The first start builds the index next to the
# corpus (CORPUS.jsonl.bm25s/) and later starts reuse it. Point the trainer at it with
# --config.search.engine=local --config.search.base_url=http://HOST:PORT. On a multi-host run start
# one server reachable by every host (HOST=0.0.0.0) or one per host on 127.0.0.1.
set -euo pipefail
CORPUS="${1:?usage: launch/retriever.sh CORPUS.jsonl}"
cd "$(dirname "$0")/.."
exec python3 -m igpo_jax.search.server --corpus="$CORPUS" --host="${HOST:-127.0.0.1}" --port="${PORT:-8000}"
