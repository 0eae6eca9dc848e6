#!/usr/bin/env bash
# Train the zoo networks of one task, one network at a time, into the package (maintainers): each is
# written to a staging folder first and copied in when complete (the card last).
# Resumable: a network whose weights and card are installed is skipped, so the queue can be
# stopped and started again across sessions. Order: the C2 architectures first (vit, cnn, fan),
# seed by seed, then the heads variants.
#   nohup nice -n 19 bash benchmarks/train_zoo.sh textures > /tmp/zoo_train.log 2>&1 &
# Threads: FANLENS_TRAIN_THREADS (default 2; torch's intra-op pool).
# Parallel queues: several copies may run at once (e.g. two at FANLENS_TRAIN_THREADS=1 on 2 cores, which
# trains small networks faster in total than one at 2 threads): each claims a network with an atomic
# `mkdir` of $stage/.claims/NET before training it and skips networks another queue has claimed.
# A claim left by a queue that was killed is stale: remove $stage/.claims to start over.
# Then the extension rule (fanlens.zoo.training.EXTENSION_STEPS): every installed network whose card shows
# its planned steps ended without the stop rule, and that has no second cycle yet, trains one more cycle of
# EXTENSION_STEPS steps from its installed weights (`train-zoo --warm-start`), and the result replaces it.
set -u
task="${1:-textures}"
weights="$(python -c "from fanlens.zoo import TASKS; print(TASKS['$task']['weights'])")"
stage="${FANLENS_TRAIN_STAGE:-/tmp/fanlens_zoo_stage}"  # each network is written here, then copied into the package
threads="${FANLENS_TRAIN_THREADS:-2}"

# train_and_install NET OUT ARGS...: `fanlens train-zoo ARGS --out OUT` at $threads threads, then NET's files
# copied from OUT into the package (the card last, so a network counts as installed only when complete)
train_and_install() {
  local net="$1" out="$2"; shift 2
  OMP_NUM_THREADS="$threads" python - "$@" --out "$out" --overwrite --no-progress <<PY || return 1
import sys, torch
torch.set_num_threads($threads)
from fanlens.cli import main
sys.exit(main(['train-zoo'] + sys.argv[1:]))
PY
  mkdir -p "$weights"
  cp "$out/$net.json" "$weights/.$net.json.part" && cp "$out/$net.safetensors" "$weights/$net.safetensors" \
    && mv "$weights/.$net.json.part" "$weights/$net.json" \
    && python -c "import json; print(json.load(open('$weights/$net.json'))['validation_accuracy'])"
}

for names in "vit cnn fan" "vit-h1 vit-h2 vit-h8"; do
  for seed in 0 1 2; do
    for name in $names; do
      net="$name"; [ "$seed" != 0 ] && net="$name@$seed"
      if [ -f "$weights/$net.safetensors" ] && [ -f "$weights/$net.json" ]; then
        echo "skip $task/$net (installed)"; continue
      fi
      mkdir -p "$stage/.claims"
      if ! mkdir "$stage/.claims/$task-$net" 2>/dev/null; then
        echo "skip $task/$net (claimed by another queue)"; continue
      fi
      echo "$(date -u +%FT%TZ) train $task/$net"
      train_and_install "$net" "$stage/$net" "$name" --task "$task" --seed "$seed" || { echo "failed: $task/$net"; exit 1; }
    done
  done
done
mkdir -p "$stage/.claims"
ext="$(python -c "from fanlens.zoo.training import EXTENSION_STEPS; print(EXTENSION_STEPS)")"
for names in "vit cnn fan" "vit-h1 vit-h2 vit-h8"; do
  for seed in 0 1 2; do
    for name in $names; do
      net="$name"; [ "$seed" != 0 ] && net="$name@$seed"
      [ -f "$weights/$net.json" ] || { echo "not installed: $task/$net"; exit 1; }
      todo="$(python -c "
import json; c = json.load(open('$weights/$net.json'))
print(int(c['training'].get('stopped_at_step') is None and 'earlier_cycles' not in c))  # cards older than the stop rule: not stopped")"
      [ "$todo" = 1 ] || { echo "skip extension of $task/$net (stopped by the rule, or extended)"; continue; }
      if ! mkdir "$stage/.claims/$task-$net-ext" 2>/dev/null; then
        echo "skip extension of $task/$net (claimed by another queue)"; continue
      fi
      echo "$(date -u +%FT%TZ) extend $task/$net"
      train_and_install "$net" "$stage/$net-ext" "$name" --task "$task" --seed "$seed" --steps "$ext" \
        --warm-start "$weights/$net.safetensors" || { echo "failed: extension of $task/$net"; exit 1; }
    done
  done
done
echo "$(date -u +%FT%TZ) done"
