# Device call 1 (carry .gpuA, made by pack.sh): unpack the Java runtime, the model, pandas 2.3
# and the images into W (default /tmp/w, which stays while the machine is warm), make a lake of
# COPIES (default 60) times the 100 images as distinct files, and print what the machine has.
W=${W:-/tmp/w}; rm -rf $W; mkdir -p $W
t0=$(date +%s)
tar xJf .gpuA/jre.tar.xz -C $W
xz -dc .gpuA/model.pt.xz > $W/model.pt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $W/pd \
  .gpuA/*.whl
tar xf .gpuA/img.tar -C $W
python3 benchmarks/gpu_job/make_lake.py $W/img $W/lake ${COPIES:-60}
$W/jre/bin/java -version 2>&1 | head -2
PYTHONPATH=$W/pd python3 -c "
import sys, pandas, numpy, pyarrow, torch
print(sys.version.split()[0], 'pandas', pandas.__version__, 'numpy', numpy.__version__,
      'pyarrow', pyarrow.__version__, 'torch', torch.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
echo "python3: $(command -v python3), $(nproc) cores, $(lscpu | grep 'Model name')"
grep -o -w -E 'avx512_bf16|amx_bf16|amx_int8|avx512f' /proc/cpuinfo | sort | uniq -c
command -v nvidia-cuda-mps-control
du -sh $W/*; echo "step1 took $(( $(date +%s) - t0 )) s"
