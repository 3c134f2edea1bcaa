# Device call 2 (carry .gpuB, made by pack.sh; within 30 s of call 1): unpack pyspark and its
# jars, then run the scoring job through deploy/submit.sh (spark-submit) on call 1's lake:
# local[16] with score.device=cuda, the same on the CPU, local[4] on the GPU, then
# benchmarks/gpu_scoring.py's stages (which side limits) and, where NVIDIA's MPS daemon
# starts, local[16] on the GPU again under MPS. The GPU's and the CPU's busy share are sampled
# every 0.5 s. Logs in OUT. For a check on a CPU: GPU=cpu NCORES=2 (and COPIES=2 in call 1).
W=${W:-/tmp/w}; O=${OUT:-/tmp/out}; mkdir -p $O
[ -d $W/jre ] || { echo "step2: $W/jre missing: call 1's machine is gone"; exit 3; }
t0=$(date +%s)
mkdir -p $W/site && tar xJf .gpuB/site.tar.xz -C $W/site && tar xJf .gpuB/jars.tar.xz -C $W \
  && rm -rf $W/site/pyspark/jars && mv $W/stored $W/site/pyspark/jars || exit 4
mkdir -p $W/venv/bin
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > $W/venv/bin/python
chmod +x $W/venv/bin/python $W/site/pyspark/bin/*
ln -sfn $W/site/pyspark/bin/spark-submit $W/venv/bin/spark-submit
PD=$W/pd
if ! PYTHONPATH=$W/pd python3 -c "import pandas" 2>/dev/null; then
  PD=$PWD/benchmarks/gpu_job/shim
  echo "pandas 2.3.3 does not import here: the machine's pandas, shimmed"
fi
export JAVA_HOME=$W/jre PATH=$W/jre/bin:$PATH SPARK_HOME=$W/site/pyspark \
  PYTHONPATH=$PD:$W/site WBC_SPARK_VENV=$W/venv PYTHONUNBUFFERED=1
echo "unpacked in $(( $(date +%s) - t0 )) s; $(ls $W/site/pyspark/jars | wc -l) jars" \
  | tee $O/summary.txt
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 \
    > $O/gpu_util.csv 2>&1 &
  SMI=$!
fi
python3 benchmarks/gpu_job/cpu_sampler.py > $O/cpu_util.csv &
CPU=$!
stamp() { date '+%Y/%m/%d %H:%M:%S.%3N'; }
job() {
  tag=$1; shift
  echo "== $tag start $(stamp)" | tee -a $O/summary.txt
  s=$(date +%s.%N)
  timeout ${JOB_LIMIT:-110} deploy/submit.sh score --config conf/local.yaml \
    score.input=$W/lake score.model=$W/model.pt score.results=$W/res_$tag "$@" \
    > $O/job_$tag.log 2>&1
  rc=$?; e=$(date +%s.%N)
  echo "== $tag end $(stamp) rc=$rc wall $(python3 -c "print(round($e - $s, 1))") s" \
    | tee -a $O/summary.txt
  grep -E "body took|new images|precision auto|scoring with|failed|Error|alignment|committed" \
    $O/job_$tag.log | cut -c1-300 | head -10 | tee -a $O/summary.txt
}
job gpu16 --master "local[${NCORES:-16}]" score.device=${GPU:-cuda}
job cpu16 --master "local[${NCORES:-16}]" score.device=cpu
job gpu4 --master "local[4]" score.device=${GPU:-cuda}
echo "== stages start $(stamp)" | tee -a $O/summary.txt
timeout 120 python3 benchmarks/gpu_scoring.py --model $W/model.pt --images $W/img --n 1000 \
  --workers ${NCORES:-16} --batches 64 --udf 0 --device ${GPU:-cuda} > $O/stages.log 2>&1
rc=$?; echo "== stages end $(stamp) rc=$rc" | tee -a $O/summary.txt
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mpslog
  mkdir -p $W/mps $W/mpslog
  if timeout 20 nvidia-cuda-mps-control -d; then
    JOB_LIMIT=100 job gpu16_mps --master "local[16]" score.device=cuda
    echo quit | timeout 20 nvidia-cuda-mps-control
  else echo "MPS did not start" | tee -a $O/summary.txt; fi
else echo "no nvidia-cuda-mps-control" | tee -a $O/summary.txt; fi
kill $CPU ${SMI:-} 2>/dev/null
echo "step2 took $(( $(date +%s) - t0 )) s" | tee -a $O/summary.txt
