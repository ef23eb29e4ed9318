#!/usr/bin/env bash
# Needs make data first (the demo dataset) and Spark; prints JSON lines (epoch 2 of 2).
# One sitting, interleaved: in-memory vs streamed W1 training (demo data, 969k train rows,
# batch 256, 2 epochs; the second epoch is timed, so compilation is left out).
set -e
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/streamed_vs_memory}; rm -rf "$out" && mkdir -p "$out"
t0=$(date +%s.%N)
.venv/bin/python -m preprocessing.poisson_batches --dataset data/generated/capums \
    --output "$out/batches" --batch-size 256 --epochs 2 >&2
t1=$(date +%s.%N); echo "{\"benchmark\": \"streamed_vs_memory\", \"materialise_s\": $(python3 -c "print(round($t1 - $t0, 1))")}"
for rep in 1 2; do
  for mode in memory streamed; do
    # Both modes declare N public: the batches were drawn at q = 256 / N with the exact N.
    extra="--config.data.num_examples_public=True"
    [ $mode = streamed ] && extra="$extra --config.data.batches=$out/batches"
    .venv/bin/python -m fastdp_jax --config=configs/seq.py --config.data.path=data/generated/capums \
      --config.num_epochs=2 --config.checkpoint.enabled=False --config.export_model=False \
      --config.privacy_eval.membership_rows=0 --config.data.attack_column= $extra \
      --workdir=$out/$mode-$rep > $out/$mode-$rep.log 2>&1
    # The run's last epoch record and its summary (typed), as the report reads them.
    .venv/bin/python -c "import json;from fastdp_jax import report;run=report.load_run('$out/$mode-$rep');r,s=run.epochs[-1],run.summary;print(json.dumps(dict(benchmark='streamed_vs_memory',mode='$mode',rep=$rep,epoch_time_s=round(r['epoch_time_s'],3),train_rows_per_s=round(s.train_examples/r['epoch_time_s']),test_accuracy=s.test_accuracy,epsilon=s.epsilon)))"
  done
done
