set -u
cd /work/wt-pair21
for mode in off default; do
  date -u; uptime
  if [ $mode = off ]; then export PHI3_LORA_COMPILED_PAIR=0; else unset PHI3_LORA_COMPILED_PAIR; fi
  PHI3_LORA_CACHE=/tmp/pair21/cache PHI3_LORA_GENERATE_THREADS=2 python app.py --port 7871 --runs-dir /tmp/pair21/runs > /tmp/pair21/app_$mode.log 2>&1 &
  APP=$!
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:7871/gradio_api/info >/dev/null && break; sleep 2; done
  echo "== $mode: app up after $((i*2)) s"
  python /tmp/pair21/e2e.py http://127.0.0.1:7871/ 20261205-034457-smollm2-135m-instruct 7
  top -b -n1 | sed -n 7,12p
  kill $APP; wait $APP 2>/dev/null
done
date -u; uptime
