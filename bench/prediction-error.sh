#!/bin/sh
# issue 11: median |actual/predicted - 1| with the old profile (every exit timed) and the fitted one, cold, same bench
cd /tmp/wt-head
PY=/work/main/.venv/bin/python
for arm in all fitted all fitted; do
  if [ $arm = all ]; then export SORTEDSERVE_PROFILE_DEPTHS=0 SORTEDSERVE_PROFILE_MAX_S=1e9; else export SORTEDSERVE_PROFILE_DEPTHS=3 SORTEDSERVE_PROFILE_MAX_S=15; fi
  SORTEDSERVE_REPROFILE=1 $PY -m app bench budget --model model_store/default --rates 1x,2x --duration 10 --threads 2 --out /tmp/bench/prederr-$arm-$$-$(date +%s).json --log /tmp/bench/prederr-server.log
done
