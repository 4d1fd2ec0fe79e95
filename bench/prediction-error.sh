#!/bin/sh
# Issue 11: median |actual/predicted - 1| with the old start-up profile (every exit timed) and the
# fitted one (3 exits timed), each from a cold profile, interleaved, twice. Ran at cc44e27 on
# 2026-12-04; results in bench/results/prediction-error-{all-exits,fitted}-{1,2}.json.
cd "$(dirname "$0")/.." || exit 1
i=0
for arm in all-exits fitted all-exits fitted; do
  i=$((i + 1))
  if [ $arm = all-exits ]; then depths=0 cap=1e9; else depths=3 cap=15; fi
  SORTEDSERVE_PROFILE_DEPTHS=$depths SORTEDSERVE_PROFILE_MAX_S=$cap SORTEDSERVE_REPROFILE=1 \
    .venv/bin/python -m app bench budget --model model_store/default --rates 1x,2x --duration 10 \
    --threads 2 --out "bench/results/prediction-error-$arm-run$i.json" \
    --log bench/results/prediction-error-server.log
done
