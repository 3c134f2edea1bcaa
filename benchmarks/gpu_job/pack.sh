#!/usr/bin/env bash
# The scoring job through spark-submit on a lent GPU machine (issue 12's GPU check), which has
# no Java and no pyspark and takes at most 64 MiB per call: pack what it lacks into two
# payloads, each sent with one call, the second within the 30 s the machine stays warm.
#
#   bash benchmarks/gpu_job/pack.sh [MODEL]         (default runs/model/model.pt; needs jlink)
#   device call 1: bash benchmarks/gpu_job/step1.sh, carry .gpuA   (about 15 s there)
#   device call 2: bash benchmarks/gpu_job/step2.sh, carry .gpuB   (about 5 min there)
#
# .gpuA: a Java 17 runtime made by jlink with 23 modules chosen for Spark (78 MB, 18 MB as xz), the
#   model, pandas 2.3.3 wheels for Python 3.12 (pyspark 3.5 calls two pandas helpers that
#   pandas 3 removed) and 100 real images (50 of KRD-WBC, 10 per class of PBC-dev).
# .gpuB: pyspark's Python package, and the jars a local-mode job that reads files and writes
#   Parquet loads: 129 of its 252 (no Hive, Kubernetes, Mesos, YARN, MLlib, RocksDB), their
#   other platforms' native libraries left out, stored uncompressed so that xz packs them.
# Checked on this machine's CPU: step1.sh and step2.sh with W, OUT, GPU=cpu, NCORES=2 and
# COPIES=2 set (docs/PERFORMANCE.md, "The scoring job on a GPU machine: prepared").
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
model="${1:-runs/model/model.pt}"
[ -f "$model" ] || { echo "pack: no model at $model (make demo trains one)" >&2; exit 2; }
command -v jlink >/dev/null || {
  echo "pack: jlink not found: it comes with a JDK 17 (apt-get install openjdk-17-jdk-headless)" >&2
  exit 2; }
py=.venv/bin/python
site="$("$py" -c 'import os, pyspark; print(os.path.dirname(os.path.dirname(pyspark.__file__)))')"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
rm -rf .gpuA .gpuB; mkdir -p .gpuA .gpuB

jlink --add-modules java.base,java.logging,java.management,java.naming,java.sql,java.xml,\
jdk.unsupported,java.security.jgss,java.security.sasl,java.desktop,java.scripting,\
jdk.management,java.instrument,java.net.http,jdk.crypto.ec,jdk.zipfs,java.compiler,java.rmi,\
jdk.security.auth,jdk.security.jgss,jdk.naming.dns,java.transaction.xa,jdk.net \
  --strip-debug --no-header-files --no-man-pages --output "$tmp/jre"
tar cf - -C "$tmp" jre | xz -9e -T2 > .gpuA/jre.tar.xz
xz -6 -T2 -c "$model" > .gpuA/model.pt.xz
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpuA \
  pandas==2.3.3 pytz tzdata
krd="$("$py" -c 'from wbc_spark.sources.krd_wbc import default_root; print(default_root())')"
pbc="$("$py" -c 'from wbc_spark.config import shared_lake
print(shared_lake("PBC-dev", "WBC_SPARK_PBC_DEV"))')"
mkdir "$tmp/img"
for f in $(ls "$krd/Dataset/image" | sort -V | awk 'NR % 12 == 1' | head -50); do
  cp "$krd/Dataset/image/$f" "$tmp/img/krd_$f"
done
for c in Neutrophil Lymphocyte Monocyte Eosinophil Basophil; do
  for f in $(ls "$pbc/$c" | sort | head -10); do cp "$pbc/$c/$f" "$tmp/img/pbc_${c}_$f"; done
done
tar cf .gpuA/img.tar -C "$tmp" img

mkdir "$tmp/site"
cp -r "$site/pyspark" "$site/py4j" "$site/pyarrow_hotfix" "$tmp/site/"
rm -rf "$tmp/site/pyspark/"{jars,examples,data}
find "$tmp/site" -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$tmp/site" . | xz -9 -T2 > .gpuB/site.tar.xz
"$py" - "$site/pyspark/jars" "$tmp/stored" <<'PY'
import pathlib, re, sys, zipfile

# What a local-mode job that reads files and writes Parquet does not load. The scoring job ran
# without these; it failed without ivy and without the Hadoop client runtime, so they stay.
LEFT_OUT = re.compile(
    r"^(rocksdbjni|hive-|spark-hive|kubernetes-|spark-kubernetes|mesos|spark-mesos|spark-yarn|"
    r"hadoop-yarn|spark-mllib|breeze|spire|algebra|cats-kernel|arpack|blas-|lapack|JTransforms|"
    r"JLargeArrays|scala-compiler|spark-repl|spark-graphx|spark-streaming|derby|datanucleus|"
    r"bonecp|HikariCP|jdo-api|javax.jdo|libthrift|libfb303|zookeeper|curator|okhttp|okio|"
    r"logging-interceptor|zjsonpatch|jline|ST4|antlr-runtime|javolution|jpam|jta-|"
    r"transaction-api|super-csv|opencsv|orc-|hive-storage|netty-all|datasketches|dropwizard|"
    r"commons-dbcp|commons-pool|snakeyaml|jackson-dataformat-yaml|json-1.8|jodd|stax-api|"
    r"avro-ipc|avro-mapred|javassist|gson|httpclient|httpcore|jsr305|shims-|xz-|tink-)"
    r"|osx|aarch")
FOREIGN = re.compile(r"darwin|osx|Mac|win32|windows|Windows|aarch64|aarch_64|ppc64|s390x|arm|"
                     r"freebsd|FreeBSD|AIX|aix|sunos|SunOS|loongarch|riscv")
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir()
kept = [j for j in sorted(src.glob("*.jar")) if not LEFT_OUT.search(j.name)]
for jar in kept:
    with zipfile.ZipFile(jar) as zin, zipfile.ZipFile(dst / jar.name, "w") as zout:
        for info in zin.infolist():
            native = info.filename.endswith((".so", ".dll", ".dylib", ".jnilib", ".a", "/"))
            if native and FOREIGN.search(info.filename):
                continue
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_STORED)
print(f"pack: {len(kept)} of {len(list(src.glob('*.jar')))} jars")
PY
tar cf - -C "$tmp" stored | xz -9 -T2 > .gpuB/jars.tar.xz
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
for d in .gpuA .gpuB; do
  echo "pack: $d $(du -cb $d | tail -1 | cut -f1) bytes, with the tracked tree" \
       "$(( $(du -cb $d | tail -1 | cut -f1) + tree )) of 67108864 a call may send"
done
