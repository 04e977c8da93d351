#!/bin/bash
# Issue 13's like-for-like suite timing: the test functions that exist both at wave 1 (f1d12ac) and
# today (same file, same name), run with `make test`'s flags on a cold compile cache. Run from a
# fresh clone's root after `make setup`.
set -e
BASE=${BASE:-f1d12ac}
old=$(mktemp); new=$(mktemp)
for f in $(git ls-tree --name-only "$BASE" tests/ | grep 'test_.*\.py$'); do
  git show "$BASE:$f" | grep -oE '^def test_[A-Za-z0-9_]+' | sed "s|^def |$f::|"; done | sort -u > "$old"
for f in tests/test_*.py; do grep -oE '^def test_[A-Za-z0-9_]+' "$f" | sed "s|^def |$f::|"; done | sort -u > "$new"
ids=$(comm -12 "$old" "$new")
echo "$(echo "$ids" | wc -l) test functions in common"
rm -rf .jax_cache
/usr/bin/time -f "wave-1 subset wall %e s" .venv/bin/python -m pytest -q -n auto --maxprocesses=4 --dist worksteal $ids
