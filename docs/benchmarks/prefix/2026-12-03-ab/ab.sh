#!/bin/bash
# alternating before/after pairs of the model-alone shared-prefix rows at 3 questions per image
cd /tmp
for i in 1 2; do
  for arm in before after; do
    if [ $arm = before ]; then P=/tmp/after; else P=/tmp/carry; fi
    echo "== $arm $i $(date +%T)"
    PYTHONPATH=$P /work/main/.venv/bin/python /tmp/prof/pfx.py 3 2>&1 | grep -v "Loading\|Writing"
  done
done
