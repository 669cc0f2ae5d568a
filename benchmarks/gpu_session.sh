#!/usr/bin/env bash
# One device call that answers every GPU question of issues 6, 7 and 39, in this order:
#   1. environment (GPU, versions), the uint8 cache of the sub100 zip;
#   2. the GPU-only tests;
#   3. `cclnb bench` at 32 px (ResNet-18, batch 512): every speed option's row (--prefetch,
#      --grouped-bn strided, plain BatchNorm as the bound) and where a step's time goes;
#   4. `cclnb bench` at 224 px (ResNet-50, batch 256): the authors' row, the uint8 fast path, the
#      device JPEG decoder (--loader decode, with and without --prefetch), the ceiling; first batch;
#   5. if time is left, the 32 px ceiling and fast path under torch.compile, then under
#      torch.compile's reduce-overhead mode (CUDA graphs), each its own run and table;
#   5b. if time is left, the linear protocol's pass for 1 and 7 encoders (`cclnb lincls --also`,
#      benchmarks/lincls_pass.py): the evaluation throughputs issue 42's cost model assumes;
#   6. if time is left, the tin100-32 study (4 methods, 10 tasks, SEEDS, the fast probe at the end) with epochs
#      per task chosen from step 3's measured throughput so that it ends inside DEADLINE (the
#      arithmetic is written to $OUT/plan.md), then the report.
# Every step has its own timeout and a failure does not stop the later steps; each bench table is
# rewritten after every cell, so a timeout keeps the cells measured. At the end the logs and the
# study's records are packed, so that at most 8 files lie under $OUT (what comes back).
# The expected numbers of every row are in docs/performance.md ("Expected in the next GPU call").
#
# Run from the repository root on the device machine, with the data and wheels carried. The zip
# (52 MB) and the tracked tree (14 MB) together pass the 64 MiB a call may carry; xz shrinks the
# zip to 19 MB (55,000 small JPEGs: the zip's per-file headers compress away), unpacked there:
#   echo /.devdata/ >> .git/info/exclude; mkdir -p .devdata
#   xz -T2 -c ../shared/data/tiny-imagenet-32-sub100.zip > .devdata/tiny-imagenet-32-sub100.zip.xz
#   run(command="bash benchmarks/gpu_session.sh", carry=[".devdata", ".whl"], timeout_s=570)
# The device image has no Jupyter stack: fetch it as Python 3.12 wheels once (5.3 MB; debugpy,
# jedi, parso and tzdata are left out, the kernel runs without them):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     papermill nbconvert nbformat nbclient ipykernel ipython jupyter-client jupyter-core \
#     traitlets pyzmq tornado comm matplotlib-inline prompt-toolkit wcwidth pexpect ptyprocess \
#     stack-data executing asttokens pure-eval ipython-pygments-lexers nest-asyncio2 tenacity \
#     entrypoints platformdirs jsonschema jsonschema-specifications referencing rpds-py \
#     fastjsonschema mistune bleach tinycss2 webencodings pandocfilters defusedxml \
#     beautifulsoup4 soupsieve jupyterlab-pygments submitit cloudpickle psutil
# (--target puts nbconvert's templates under /tmp/site/share/jupyter: JUPYTER_PATH points there.)
# Rehearse on a CPU first:  REHEARSAL=1 OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CCLNB_CACHE=${CCLNB_CACHE:-/tmp/cclnb-cache}
PY=${PY:-python3}
DATA=${DATA:-.devdata/tiny-imagenet-32-sub100.zip}
SEEDS=${SEEDS:-0 1 2}                  # the study's seeds (the verdict needs a spread)
DEADLINE=${DEADLINE:-540}              # seconds the whole script may take (the call's timeout: 570)
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/session.log"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) - 20 )); }   # seconds before the deadline, a margin kept

if [ ! -f "$DATA" ] && [ -f "$DATA.xz" ]; then   # the carried copy is xz-compressed
  $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      "$DATA.xz" "$DATA"
fi

if ls .whl/*.whl >/dev/null 2>&1; then   # papermill & co. travel as wheels (not on the device image)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site JUPYTER_PATH=/tmp/site/share/jupyter
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${REHEARSAL:-0}" = 1 ]; then       # CPU rehearsal: same steps, toy sizes
  # the bench at an eighth of the width in fp32: every row's code path, at a cost these cores can pay
  DEV=cpu; BENCH32="--batch-size 8 --steps 1 --warmup 1 --workers 1 --width 8 --precision fp32"
  BENCH224="--batch-size 4 --steps 1 --warmup 1 --workers 1 --width 8 --precision fp32"
  # an eighth of the width and 2 tasks: the per-task kNN of a full-width ResNet-18 over the 5,000
  # val images alone takes minutes on 2 CPU cores, which no rehearsal budget holds
  # (the probe's features of 50,000 train images alone took 138 s a run on these cores: 3 per class)
  STUDY_EXTRA="-p subset_per_class=3 -p batch_size=16 -p bn_groups=2 -p key_bn_groups=2 -p device=cpu -p precision=fp32 -p linear_eval.device=cpu -p linear_eval.precision=fp32 -p linear_eval.subset_per_class=3 -p width=8 -p n_tasks=2 --jobs 2"
  # on 2 busy CPU cores: torch.compile took over 120 s per mode, the study 37 of its 39 steps in 420 s
  T32=900; T224=600; TCOMPILE=300; STUDY_TIMEOUT=600; DEADLINE=3000; SEEDS=${REHEARSAL_SEEDS:-0 1}
  LINCLS="-a resnet18 --width 8 --image-size 32 --encoders 1 3 --subset-per-class 2 -b 32 -j 1 --device cpu --precision fp32"
  TLINCLS=300
else
  # 224 px: the authors' row decodes and resizes the JPEGs on 16 workers, ~32 s a cell (first session)
  DEV=cuda; BENCH32="--steps 50 --workers 16"; BENCH224="--steps 15 --workers 16"
  STUDY_EXTRA=""; T32=200; T224=200; TCOMPILE=180; STUDY_TIMEOUT=
  # ResNet-50 at 224 px on 10,000 training images an epoch (40 batches: worker start-up is a small share); 7 encoders = a seed of the paper's study
  LINCLS="-a resnet50 --image-size 224 --encoders 1 7 --subset-per-class 100 -b 256 -j 16 --device cuda --precision bf16"
  TLINCLS=180
fi
ROWS32=authors,fast,prefetch,prefetch-strided,ceiling,strided,plain-bn
ROWS224=authors,fast,decode,decode-prefetch,ceiling
MIN_STUDY=${MIN_STUDY:-150}   # fewer seconds left than this: no study (kernel starts and kNN alone take ~120 s)

log "1. environment"
{ nvidia-smi 2>/dev/null; $PY -c "import torch, torchvision, sys; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"; git rev-parse HEAD; } > "$OUT/env.txt" 2>&1
timeout 120 $PY -m cclnb data cache "$DATA" 2>&1 | tail -3 | tee -a "$OUT/session.log"

log "2. GPU tests"
if [ "$DEV" = cuda ]; then
  timeout 150 $PY -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors \
    > "$OUT/gpu_tests.log" 2>&1
  log "gpu tests exit $?: $(tail -1 "$OUT/gpu_tests.log")"
fi

log "3. bench 32 px: every option's row and the profile"
timeout $T32 $PY -m cclnb bench --device $DEV --data "$DATA" $BENCH32 --rows $ROWS32 --profile \
  --out "$OUT/bench-32px.md" > "$OUT/bench.log" 2>&1
log "bench 32 px exit $?"
log "4. bench 224 px: authors, fast path, device decode, ceiling"
timeout $T224 $PY -m cclnb bench --device $DEV --data "$DATA" --arch resnet50 --image-size 224 \
  --batch-size 256 $BENCH224 --rows $ROWS224 --out "$OUT/bench-224px.md" >> "$OUT/bench.log" 2>&1
log "bench 224 px exit $?"
log "5. compiled rows, if time is left"
# each mode its own run and file: a compile that overruns must not cost the eager tables above
for MODE in default reduce-overhead; do
  T=$(left); [ $T -lt $TCOMPILE ] && T_MODE=$T || T_MODE=$TCOMPILE
  if [ $T_MODE -ge 60 ]; then
    timeout $T_MODE $PY -m cclnb bench --device $DEV --data "$DATA" $BENCH32 --rows ceiling --compile \
      --compile-mode $MODE --out "$OUT/bench-32px-compile-$MODE.md" >> "$OUT/bench.log" 2>&1
    log "bench 32 px compile ($MODE) exit $?"
  else
    log "bench 32 px compile ($MODE) skipped: ${T}s left"
  fi
done

log "5b. the linear protocol's pass, 1 and several encoders, if time is left"
T=$(left); [ $T -lt $TLINCLS ] && T_LIN=$T || T_LIN=$TLINCLS
if [ $T_LIN -ge 60 ]; then
  timeout $T_LIN $PY benchmarks/lincls_pass.py --data "$DATA" $LINCLS --out "$OUT/lincls-pass.md" \
    > "$OUT/lincls_pass.log" 2>&1
  log "lincls pass exit $?"
else
  log "lincls pass skipped: ${T}s left"
fi

log "6. study: plan the epochs from the measured throughput"
REMAIN=${STUDY_TIMEOUT:-$(left)}   # the device's budget; a rehearsal's own
if [ "$REMAIN" -lt "$MIN_STUDY" ]; then
  log "study skipped: ${REMAIN}s left, under MIN_STUDY=${MIN_STUDY}s"
else
  # training gets under half of what is left: kernel starts, per-task kNN, replay selection and
  # the linear evaluation of every (method, seed) take the rest
  STUDY_BUDGET=${STUDY_BUDGET:-$(( REMAIN * 45 / 100 ))}
  N_SEEDS=$(echo $SEEDS | wc -w)
  EPOCHS=$($PY benchmarks/plan_epochs.py "$OUT/bench-32px.md" --budget "$STUDY_BUDGET" \
           --seeds "$N_SEEDS" --out "$OUT/plan.md") || EPOCHS=1
  STUDY=tin100-32-e$EPOCHS   # one study per budget: a later session's seeds join the same epochs only
  log "study $STUDY: ${STUDY_BUDGET}s of training over seeds $SEEDS, $EPOCHS epochs per task, ${REMAIN}s in all"
  # The final evaluation is the fast probe (features once, a convex L-BFGS fit: seconds), as in the
  # CPU studies: the paper's augmented lincls costs about 30 epochs x 50,000 images per (method,
  # seed), more than the 12 pairs can share in these minutes.
  timeout $REMAIN $PY -m cclnb study --preset tin100-32 --study $STUDY -p data="$DATA" -p epochs="$EPOCHS" \
    -p linear_eval.protocol=probe -p linear_eval.epochs=100 --seeds $SEEDS $STUDY_EXTRA \
    > "$OUT/study.log" 2>&1
  log "study exit $? after $(( $(date +%s) - START ))s"
  tar czf "$OUT/study.tgz" --exclude='*.pt' runs/$STUDY reports/$STUDY 2>/dev/null
fi
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls bench.log gpu_tests.log lincls_pass.log study.log env.txt plan.md 2>/dev/null))
log "done in $(( $(date +%s) - START ))s"
