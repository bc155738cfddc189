#!/usr/bin/env bash
# Check transparent GPU checkpoint/restart end to end, on a machine with an NVIDIA GPU.
#
# Needs: root, python3 with PyTorch and cuda-bindings (the lent GPU machines have both),
# and the bundle made HERE by scripts/gpu-bundle.sh (CRIU + its libraries, pycriu, the
# wheels of ccr's dependencies): the GPU machine has no package registry.
#
#   scripts/gpu-check.sh            from the repository root, with .gpu-bundle/ beside it
#
# Phase A drives ccr.engines.gpu alone on a live CUDA process (lock, checkpoint, restore,
# unlock in place). Phase B runs a PyTorch job under ccr (`ccr run`), checkpoints it
# (`ccr create`), kills it (`ccr cancel`), restarts it (`ccr restart`) and checks that its
# step counter and GPU tensors carry on where the checkpoint left them. It prints the
# timings: GPU checkpoint, CRIU dump, restore, GPU restore, image size.
#
# Environment: BUNDLE (.gpu-bundle), PYTHON (python3), GPU_MB (GPU memory the job fills,
# 2048), JOB_ID (4242), CCR_COMPRESS (as ccr: zstd by default), PHASES (AB; B alone skips
# the in-place check), REQUIRE_GPU (1: fail unless the manifest records GPU processes),
# KEEP_WORK=1 (keep the temporary directory).
set -euo pipefail

BUNDLE=$(realpath "${BUNDLE:-.gpu-bundle}")
PY=${PYTHON:-python3}
GPU_MB=${GPU_MB:-2048}
JOB=${JOB_ID:-4242}
PHASES=${PHASES:-AB}
export GPU_MB

say() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu-check: FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "CRIU needs root"
[ -x "$BUNDLE/bin/criu" ] || die "no bundle at $BUNDLE: run scripts/gpu-bundle.sh first (here)"

WORK=$(mktemp -d /tmp/ccr-gpu-check.XXXXXX)
SMOKE_PID=""
cleanup() {
    if [ -n "$SMOKE_PID" ]; then kill -KILL "$SMOKE_PID" 2>/dev/null || true; fi
    ccr cancel "$JOB" >/dev/null 2>&1 || true
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- set-up -----------------------------------------------------------------------------

say "machine"
uname -r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" - <<'EOF'
import sys, torch
from importlib.metadata import PackageNotFoundError, version
try:
    bindings = version("cuda-bindings")
except PackageNotFoundError:
    bindings = "MISSING (phase A and GPU checkpoints will fail)"
print("python", sys.version.split()[0], "torch", torch.__version__,
      "cuda-bindings", bindings, "cuda available", torch.cuda.is_available())
EOF

SITE=$WORK/site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$BUNDLE"/wheels/*.whl
cp -r "$BUNDLE/site/pycriu" "$SITE/pycriu"
if [ -f ccr/__init__.py ]; then SRC=$PWD; else SRC=$BUNDLE/src; fi
export PYTHONPATH="$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# CRIU's libraries: the system's where it has them (newer), the carried ones for the rest.
LIBDIR=$WORK/lib
mkdir -p "$LIBDIR"
system_libs=$(ldconfig -p)
for lib in "$BUNDLE"/lib/*; do
    name=$(basename "$lib")
    if ! grep -q "^[[:space:]]*$name " <<<"$system_libs"; then ln -s "$lib" "$LIBDIR/$name"; fi
done
echo "carried libraries used: $(find "$LIBDIR" -mindepth 1 -printf '%f ')"
export LD_LIBRARY_PATH=$LIBDIR
export CCR_CRIU=$BUNDLE/bin/criu
if ! "$CCR_CRIU" --version >/dev/null 2>&1; then
    export LD_LIBRARY_PATH=$BUNDLE/lib   # the system's versions did not do: all carried ones
fi
"$CCR_CRIU" --version | head -1 || die "the carried CRIU does not run"
"$CCR_CRIU" check 2>&1 | tail -3 || echo "(criu check reported problems: dumps may fail)"
export CCR_INIT=$SITE/bin/dumb-init
export CCR_STATE_DIR=$WORK/state
ccr() { "$PY" -m ccr "$@"; }
ccr --help >/dev/null || die "ccr does not start"

# The job: a CUDA tensor x (int64, 1M elements) incremented every step, whose sum is known
# from the step number alone; a block of GPU_MB MiB of random integers whose sum was taken
# at start (in host memory); a matrix product compared with the first one.
cat >"$WORK/workload.py" <<'EOF'
import os, time
import torch

dev = torch.device("cuda")
gen = torch.Generator(device=dev)
gen.manual_seed(1234)
n = 1 << 20
big = torch.randint(0, 1 << 20, (int(os.environ.get("GPU_MB", "2048")) << 17,),
                    dtype=torch.int64, device=dev, generator=gen)
big_sum = int(big.sum().item())
a = torch.randn(1024, 1024, device=dev, generator=gen)
c0 = a @ a
x = torch.arange(n, dtype=torch.int64, device=dev)
base = n * (n - 1) // 2
print(f"start pid={os.getpid()} gpu={torch.cuda.get_device_name(0)} big_sum={big_sum}",
      flush=True)
step = 0
while True:
    step += 1
    x.add_(1)
    total = int(x.sum().item())
    ok = total == base + step * n and int(big.sum().item()) == big_sum
    ok = ok and bool(torch.equal(a @ a, c0))
    print(f"step={step} sum={total} ok={int(ok)}", flush=True)
    time.sleep(0.2)
EOF

last_step() { awk -F'[ =]' '/^step=/ { s = $2 } END { print s + 0 }' "$1"; }

wait_step() {  # FILE STEP TIMEOUT: wait until FILE shows step >= STEP
    local deadline=$((SECONDS + $3))
    while [ "$(last_step "$1")" -lt "$2" ]; do
        [ $SECONDS -lt $deadline ] || { tail -5 "$1" >&2; die "no step $2 in $1 after $3 s"; }
        sleep 0.2
    done
}

# --- phase A: the driver sequence alone, on a live process ------------------------------

if [[ $PHASES == *A* ]]; then
    say "phase A: lock, checkpoint, restore, unlock in place (ccr.engines.gpu)"
    env -u LD_LIBRARY_PATH -u PYTHONPATH "$PY" "$WORK/workload.py" >"$WORK/smoke.out" 2>&1 &
    SMOKE_PID=$!
    wait_step "$WORK/smoke.out" 3 180
    "$PY" - "$SMOKE_PID" <<'EOF'
import os, sys, time
from ccr.deadline import Deadline
from ccr.engines import gpu

pid = int(sys.argv[1])
backend = gpu.default_backend()
assert backend.available(), backend.unavailable_reason()
assert gpu.cuda_pids([pid]) == [pid], "the workload holds no /dev/nvidia* descriptor"
seq = gpu.GpuSequence(backend, deadline=Deadline.after(120))
assert seq.checkpoint([pid]) == [pid]
state = backend.state(pid)
fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
left = [f for f in fds if gpu.is_cuda_device(f)]
print(f"checkpointed: state={state}, /dev/nvidia* descriptors left: {left or 'none'}")
assert state == "checkpointed", state
time.sleep(1)
seq.resume()
print("state after resume:", backend.state(pid))
print("record:", seq.record())
EOF
    before=$(last_step "$WORK/smoke.out")
    wait_step "$WORK/smoke.out" $((before + 5)) 60
    grep -q 'ok=0' "$WORK/smoke.out" && { tail "$WORK/smoke.out"; die "phase A: GPU state changed"; }
    kill -KILL "$SMOKE_PID"
    SMOKE_PID=""
    echo "phase A: OK (steps continued to $(last_step "$WORK/smoke.out"), every check ok)"
fi

# --- phase B: ccr run, create, cancel, restart --------------------------------------------

say "phase B: ccr run / create / cancel / restart of a PyTorch job (${GPU_MB} MiB on the GPU)"
OUTF=$WORK/job.out
mkdir -p "$WORK/ckpt"
(cd "$WORK" && ccr run --detach --job-id "$JOB" --checkpoint-dir "$WORK/ckpt" -o "$OUTF" \
    -- env -u LD_LIBRARY_PATH -u PYTHONPATH "$PY" "$WORK/workload.py")
wait_step "$OUTF" 5 180

t0=$(date +%s.%N)
if ! ccr create "$JOB" --json >"$WORK/create.json"; then
    cat "$WORK/create.json"
    find "$CCR_STATE_DIR" -name 'dump.log' -exec sh -c 'echo "--- $1"; grep -E "Error|GPU|nvidia" "$1" | tail -20' _ {} \;
    die "ccr create failed (is the GPU sequence wired into ccr/controller/checkpoint.py?)"
fi
t1=$(date +%s.%N)
ckpt_step=$(last_step "$OUTF")
sleep 2
ccr cancel "$JOB" >/dev/null
lines_before=$(wc -l <"$OUTF")
last_before=$(last_step "$OUTF")
echo "checkpoint taken near step $ckpt_step; job killed at step $last_before"

t2=$(date +%s.%N)
if ! ccr restart "$JOB" --json >"$WORK/restart.json"; then
    cat "$WORK/restart.json"
    find "$CCR_STATE_DIR" -name 'restore.log' -exec sh -c 'echo "--- $1"; grep -E "Error" "$1" | tail -20' _ {} \;
    die "ccr restart failed (is the GPU restore wired into ccr/controller/restart.py?)"
fi
t3=$(date +%s.%N)

# The restored job goes on from the checkpoint: wait for 5 steps of it.
deadline=$((SECONDS + 120))
until [ "$(tail -n +$((lines_before + 1)) "$OUTF" | grep -c '^step=')" -ge 5 ]; do
    [ $SECONDS -lt $deadline ] || { tail "$OUTF"; die "the restored job prints nothing"; }
    sleep 0.2
done

"$PY" - "$OUTF" "$lines_before" "$last_before" <<'EOF'
import sys

path, lines_before, last_before = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = open(path).read().splitlines()
starts = [ln for ln in lines if ln.startswith("start ")]
after = [ln for ln in lines[lines_before:] if ln.startswith("step=")]
steps = [int(ln.split()[0].split("=")[1]) for ln in after]
bad = [ln for ln in lines if ln.startswith("step=") and not ln.endswith("ok=1")]
assert len(starts) == 1, f"the job started {len(starts)} times: restarted from scratch"
assert not bad, f"GPU state wrong: {bad[:3]}"
assert 1 < steps[0] <= last_before + 1, f"restored at step {steps[0]}, killed at {last_before}"
assert steps == list(range(steps[0], steps[0] + len(steps))), f"steps not consecutive: {steps}"
print(f"continuity: OK (restored job went on from step {steps[0]} to {steps[-1]}, "
      "counter and GPU checksums right)")
EOF

say "timings"
ccr show "$JOB" --json >"$WORK/show.json"
"$PY" - "$WORK/create.json" "$WORK/restart.json" "$WORK/show.json" "$t0" "$t1" "$t2" "$t3" \
    <<'EOF'
import json, os, sys

create, restart, show = (json.load(open(p)) for p in sys.argv[1:4])
t0, t1, t2, t3 = map(float, sys.argv[4:8])
show = show.get("checkpoints", show) if isinstance(show, dict) else show
restart = restart.get("steps", restart) if isinstance(restart, dict) else restart
m = show[0] if isinstance(show, list) else show
g, st = m.get("gpu") or {}, m.get("stats") or {}
c = create[0] if isinstance(create, list) else create
r = restart[0] if isinstance(restart, list) else restart
rg = r.get("gpu") or {}


def s(v):
    return "n/a" if v in (None, "") else f"{float(v):8.3f} s"


print(f"GPU processes           {g.get('pids')} (ns {g.get('ns_pids')})")
print(f"GPU lock                {s(g.get('gpu_lock_s'))}")
print(f"GPU checkpoint          {s(g.get('gpu_checkpoint_s'))}   (lock + device->host copy)")
print(f"CRIU dump               {s(st.get('dump_wall_time'))}   (frozen {s(st.get('frozen_time')).strip()})")
print(f"GPU restore after dump  {s(g.get('gpu_restore_s'))}   (leave-running)")
print(f"ccr create, total       {s(c.get('total_time'))}   (wall {t1 - t0:.3f} s)")
print(f"ccr restart, restore    {s(r.get('restore_time'))}   (wall {t3 - t2:.3f} s)")
print(f"GPU restore on restart  {s(rg.get('gpu_restore_s'))}")
print(f"image                   {m.get('image_bytes', 0) / 2**20:8.1f} MiB raw, "
      f"{m.get('stored_bytes', 0) / 2**20:.1f} MiB stored ({m.get('compression')})")
if os.environ.get("REQUIRE_GPU", "1") == "1" and not g.get("pids"):
    sys.exit("gpu-check: FAIL: the checkpoint's manifest records no GPU process")
EOF
du -sh "$WORK/ckpt"
say "gpu-check: PASS"
