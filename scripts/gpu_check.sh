#!/usr/bin/env bash
# The prepared device check (issue 15): what a first GPU session runs, in under 6 minutes on
# one H100/H200, with nothing but this checkout and the wheels in .whl/.
#
#   scripts/gpu_check.sh [--dry-run] [stage ...]      (default: every stage, in this order)
#
#   tests        pytest -m gpu (tests/test_gpu.py and any other gpu-marked test)
#   bench_train  bench train, UNet and ResNet34-UNet at 256 px, batch 32, bf16 + channels-last,
#                with --switches (compile on, fp16, fp32, contiguous, cudnn.benchmark off, ...):
#                images/s, MFU, peak memory, first-step compile time; UNet also the real trainer
#   max_batch    the largest UNet batch at 256 px that trains (bench train --max-batch)
#   bench_data   bench data --workers 0,2,8 --decode gpu: the streaming loader vs the seed's and
#                webdataset's, jpeg decoded in the workers and (data.decode=gpu) by nvJPEG
#   train_2ep    dist-seg train, configs/unet.yaml, 2 epochs of a synthetic set at 256 px
#
# Writes into ${OUT:-gpu_check_out}: gpu_check.json (stage -> status, seconds, figures),
# gpu_check.log (everything), <stage>.log, and each stage's own JSON. The JSON is rewritten
# after every stage, so a run cut short keeps what it finished. Each stage has its own timeout
# (GPU_CHECK_TIMEOUT_<stage>=seconds overrides); they add up to under 6 minutes (3x that in a
# dry run).
#
# The GPU machine has torch, accelerate, rich, pyyaml, matplotlib and torchvision but no
# package index: it lacks webdataset, braceexpand and pytest. Fill .whl/ on a machine with
# internet (pure-Python wheels, any platform), and carry it with the checkout:
#   pip download --no-deps -d .whl webdataset braceexpand pytest pluggy iniconfig pytest-timeout
# The script installs them with `pip install --no-index --no-deps` (into a private directory
# if the system site is not writable) and runs the project from the checkout: PYTHONPATH=.
# and `python3 -m dist_seg` (an editable install would need build dependencies it cannot fetch).
#
# --dry-run (or GPU_CHECK_ALLOW_CPU=1): every stage on the CPU at tiny sizes, to check the
# plumbing (stage selection, timeouts, JSON) on a machine without a GPU.
set -u -o pipefail

STAGES=(tests bench_train max_batch bench_data train_2ep)
declare -A LIMIT=([tests]=50 [bench_train]=160 [max_batch]=45 [bench_data]=50 [train_2ep]=50)
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_ALLOW_CPU:-0}
[ "$DRY" = 1 ] || DRY=0
OUT=${OUT:-gpu_check_out}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/dist_seg_gpu_check}
export PYTHONPATH="$PWD:$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

# --- one stage's commands (run as `gpu_check.sh __body STAGE` under the stage's timeout) ------
body() {
  local stage=$1 tiny=()
  case $stage in
  tests)
    local files
    files=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
    # shellcheck disable=SC2086
    $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/tests.xml" $files
    ;;
  bench_train)
    local first=$((${LIMIT_NOW:-160} * 6 / 10)) common=(--size 256 --batch 32 --precision bf16 --warmup 3
      --steps 10 --repeats 2 --workers 8 --switches)
    [ "$DRY" = 1 ] && common=(--size 32 --width 0.0625 --num-images 20 --batch 2
      --warmup 1 --steps 1 --repeats 1 --workers 0)
    # UNet gets at most 60% of the stage, so ResNet34-UNet is measured even if UNet is not
    timeout -s KILL "$first" $PY -m dist_seg bench train --work "$WORK/bench" --model unet \
      "${common[@]}" --json "$OUT/bench_train_unet.json"
    local rc=$?
    $PY -m dist_seg bench train --work "$WORK/bench" --model resnet34_unet "${common[@]}" \
      --no-trainer --json "$OUT/bench_train_resnet34_unet.json" || return $?
    return $rc
    ;;
  max_batch)
    [ "$DRY" = 1 ] && tiny=(--width 0.0625 --max-batch-limit 64)
    $PY -m dist_seg bench train --max-batch --model unet --size 256 --precision bf16 \
      "${tiny[@]}" --json "$OUT/max_batch.json"
    local rc=$?
    if [ "$rc" = 2 ] && [ "$DRY" = 1 ]; then  # no CUDA: the one-line refusal is the answer
      echo "max_batch: refused without CUDA (expected in a dry run)"
      touch "$OUT/max_batch.refused"
      return 0
    fi
    return $rc
    ;;
  bench_data)
    local args=(--workers 0,2,8 --epochs 1 --repeats 1 --epoch-samples 1600 --num-images 300)
    [ "$DRY" = 1 ] && args=(--workers 0,1 --epochs 1 --repeats 1 --num-images 20 --size 32
      --batch 2 --epoch-samples 18)
    # One run, so the two decodes are interleaved: the "jpeg" rows decode in the workers,
    # "jpeg, gpu decode" in this process (nvJPEG; PIL in a dry run, which says so).
    $PY -m dist_seg bench data --work "$WORK/bench" "${args[@]}" --decode gpu \
      --json "$OUT/bench_data.json"
    ;;
  train_2ep)
    local n=200 sets=()  # the set bench_train made, if it ran
    [ "$DRY" = 1 ] && n=64 sets=(--set data.size=32 --set model.width=0.0625
      --set train.batch_size=4 --set data.num_workers=1 --set train.precision=no)
    rm -rf "$WORK/runs/train_2ep" "$OUT/train_2ep"
    [ -f "$WORK/bench/synth-$n/annotations/test.txt" ] ||
      $PY -m dist_seg synth --root "$WORK/bench/synth-$n" --num-images "$n" --overwrite || return $?
    $PY -m dist_seg train --config configs/unet.yaml --set data.root="$WORK/bench/synth-$n" \
      --set data.shards="$WORK/shards-$n" --set train.epochs=2 --set run.out_dir="$WORK/runs" \
      --set run.name=train_2ep --set wandb.mode=disabled "${sets[@]}"
    local rc=$?
    mkdir -p "$OUT/train_2ep"
    cp "$WORK/runs/train_2ep/"*.{json,csv,yaml} "$OUT/train_2ep/" 2>/dev/null
    return $rc
    ;;
  esac
}

if [ "${1:-}" = __body ]; then
  body "$2"
  exit $?
fi

# --- the stages chosen -----------------------------------------------------------------------
chosen=()
for arg in "$@"; do
  case $arg in
  --dry-run) DRY=1 ;;
  -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *)
    if [[ " ${STAGES[*]} " != *" $arg "* ]]; then
      echo "gpu_check.sh: unknown stage '$arg': choose from ${STAGES[*]} (or --dry-run)" >&2
      exit 2
    fi
    chosen+=("$arg")
    ;;
  esac
done
run=()
for s in "${STAGES[@]}"; do  # the fixed order, whatever order they were named in
  if [ ${#chosen[@]} -eq 0 ] || [[ " ${chosen[*]} " == *" $s "* ]]; then run+=("$s"); fi
done
export GPU_CHECK_ALLOW_CPU=$DRY OUT WORK  # for the stages, which run this script again

mkdir -p "$OUT" "$WORK" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
JSON=$OUT/gpu_check.json
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

if [ "$DRY" = 0 ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device here; run it on a GPU machine, or with --dry-run" \
    "(GPU_CHECK_ALLOW_CPU=1) for the CPU plumbing check" >&2
  exit 2
fi

# --- dependencies from .whl/ -----------------------------------------------------------------
if ! $PY -c "import webdataset, braceexpand, pytest" 2>/dev/null; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    say "webdataset, braceexpand or pytest is missing and .whl/ has no wheels: on a machine" \
      "with internet run: pip download --no-deps -d .whl webdataset braceexpand pytest" \
      "pluggy iniconfig pytest-timeout"
    exit 2
  fi
  for wheel in "${wheels[@]}"; do  # one at a time: a wheel for another Python skips alone
    $PY -m pip install --no-index --no-deps "$wheel" >>"$LOG" 2>&1 ||
      $PY -m pip install --no-index --no-deps --target "$WORK/pydeps" "$wheel" >>"$LOG" 2>&1 ||
      say "could not install $wheel (see $LOG)"
  done
  $PY -c "import webdataset, braceexpand" ||
    { say "webdataset or braceexpand still missing after installing .whl/ (see $LOG)"; exit 2; }
fi

$PY - "$JSON" "$DRY" <<'EOF'
import json, sys, time, platform
import torch
path, dry = sys.argv[1], sys.argv[2] == "1"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": dry,
           "device": gpu or "cpu", "torch": torch.__version__, "python": platform.python_version(),
           "stages": {}}, open(path, "w"), indent=1)
EOF
say "stages: ${run[*]} | out: $OUT | work: $WORK | dry run: $DRY"

# --- run them, each under its own timeout ----------------------------------------------------
failed=0
for stage in "${run[@]}"; do
  var=GPU_CHECK_TIMEOUT_$stage
  limit=${LIMIT[$stage]}
  [ "$DRY" = 1 ] && limit=$((3 * limit))  # a shared CPU, slower than a GPU even at tiny sizes
  limit=${!var:-$limit}
  say "== $stage (timeout ${limit} s)"
  t0=$(date +%s%N)
  # KILL, to the stage's whole process group: the trainer answers SIGTERM by checkpointing
  # at the next step, and loader workers ignore it, holding the log pipe open meanwhile.
  LIMIT_NOW=$limit timeout -s KILL "$limit" "$SELF" __body "$stage" 2>&1 | tee "$OUT/$stage.log" >>"$LOG"
  rc=${PIPESTATUS[0]}
  ms=$((($(date +%s%N) - t0) / 1000000))
  case $rc in
  0) status=ok ;;
  124 | 137) status=timeout ;;
  *) status=failed ;;
  esac
  [ "$status" = ok ] || failed=1
  say "$stage: $status (exit $rc) in $((ms / 1000)) s"
  $PY - "$JSON" "$OUT" "$stage" "$status" "$rc" "$ms" <<'EOF'
import json, sys
from pathlib import Path

path, out, stage, status, rc, ms = sys.argv[1:]
out = Path(out)


def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None


def train_figures(r):
    v = r["variants"]
    keep = ("images_per_s", "ms_per_image", "mfu", "peak_mem_gib", "tflops", "warmup_s")
    fig = {"flops_per_image": r["flops_per_image"], "peak_tflops": r["peak_tflops"],
           "variants": {k: {f: x.get(f) for f in keep} for k, x in v.items()}}
    compiled = next((k for k in v if "compile True" in k), None)
    if compiled and "warmup_s" in v[compiled] and "warmup_s" in v["bare"]:
        fig["compile_s"] = v[compiled]["warmup_s"] - v["bare"]["warmup_s"]
    if "trainer_overhead_pct" in r:
        fig["trainer_overhead_pct"] = r["trainer_overhead_pct"]
    return fig


GPU_DECODE = "jpeg, gpu decode"  # bench/data.py's row for data.decode=gpu


def data_figures(r, gpu):
    rows = {}
    keep = ("samples_per_s", "per_core", "samples_per_cpu_s", "toolkit_ratio", "vs_jpeg",
            "vs_jpeg_cpu")
    for row in r["results"]:
        rows[str(row["workers"])] = {
            k: {f: x[f] for f in keep if f in x}
            for k, x in row["loaders"].items() if (k == GPU_DECODE) == gpu
        }
    if gpu:
        return {"workers": rows, **r.get("gpu_decode", {})}
    return {"workers": rows, "peer_goal_met": r["peer_goal_met"], "goal_met": r["goal_met"]}


figures = {}
if stage == "tests" and (out / "tests.xml").exists():
    import xml.etree.ElementTree as ET

    root = ET.parse(out / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    figures = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    figures["not_passed"] = {
        f"{case.get('classname')}::{case.get('name')}": (child.get("message") or child.tag)[:200]
        for case in suite.iter("testcase") for child in case
        if child.tag in ("failure", "error", "skipped")
    }
    # figures a test records (record_property), e.g. nvJPEG's largest difference to PIL
    figures["recorded"] = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in suite.iter("testcase") if case.find("properties") is not None
    }
elif stage == "bench_train":
    for model in ("unet", "resnet34_unet"):
        r = load(f"bench_train_{model}.json")
        figures[model] = train_figures(r) if r else None
elif stage == "max_batch":
    r = load("max_batch.json")
    if r:
        figures = {k: r[k] for k in ("max_batch", "capped", "device_memory_gib")}
        figures["tried"] = [[t["batch"], t["fits"], round(t["peak_mem_gib"], 2)] for t in r["tried"]]
    elif (out / "max_batch.refused").exists():
        figures = {"refused": "no CUDA"}
elif stage == "bench_data":
    r = load("bench_data.json")
    if r:  # cpu: every row decoded in the workers; gpu: the data.decode=gpu rows
        figures = {"cpu": data_figures(r, False), "gpu": data_figures(r, True)}
elif stage == "train_2ep":
    summary, history = load("train_2ep/summary.json"), load("train_2ep/history.json")
    if summary:
        figures["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    if history:
        figures["epochs"] = [{k: v for k, v in row.items() if isinstance(v, (int, float))}
                             for row in history]

result = json.loads(Path(path).read_text())
result["stages"][stage] = {"status": status, "exit": int(rc), "seconds": round(int(ms) / 1000, 1),
                           "log": f"{stage}.log", "figures": figures}
tmp = Path(path + ".tmp")
tmp.write_text(json.dumps(result, indent=1) + "\n")
tmp.replace(path)
EOF
done
say "done: $JSON"
exit $failed
