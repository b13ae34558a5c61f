#!/usr/bin/env bash
# GPU check (issue #25): one call of at most 8 minutes, every part under its own hard `timeout`, from the repo root of
# a CUDA machine that has torch, transformers, peft, huggingface_hub, safetensors and tokenizers but neither Ray nor
# pdray nor the rest of pdray's needs, and no network. On the device machine:
#   scripts/gpu_check.sh "$OUT"        # with build/gpu-wheels (scripts/gpu_wheels.sh) in the call's carry
#   1. preflight (20 s): nvidia-smi, versions, nvcc, GPU memory, disk; stops with a clear message (exit 2) when
#      something essential is missing;
#   2. installs every wheel of $GPU_WHEELS (default build/gpu-wheels: pdray itself, diffusers, pydantic, trimesh,
#      nerfacc, nvdiffrast...) into a temporary --target folder, no network, and puts only that folder on PYTHONPATH;
#   3. the CUDA extensions, each by its real try (pdray/backends.py: tinycudann encodes, nvdiffrast rasterises,
#      nerfacc samples; the last two JIT-build with nvcc first), in parallel; one that fails or does not finish is
#      put in PDRAY_DISABLE_BACKENDS for the later parts, which then neither retry a broken build nor use it;
#   4. the parity tests (tests/test_backends.py, test_hashgrid.py, test_raster.py, test_occupancy.py: tinycudann,
#      nvdiffrast and nerfacc against pdray's torch code, each skipping with its reason) with the numbers into
#      OUT/parity.jsonl, then the score-replica parity (tests/test_replicas.py);
#   5. the real `pdray run --config prolificdreamer --executor local --wandb off --stages nerf` on SD 2.1-shaped
#      random weights (python -m pdray.priors.random_sd, built on the GPU while parts 3 and 4 run) for 1, 2 and 4
#      particles at 64 and 512 px, 3 steps each: seconds per step, peak GPU memory, or why a row has none (out of
#      memory, timeout, error), into OUT/sd_runs.{md,json};
#   6. benchmarks/gpu_step.py at 512 px, fp16, 1, 2, 4 particles into OUT/gpu_step.{json,md}, if time remains;
#   then a summary. OUT gets at most 7 files: gpu_check.log, backends.json, parity.jsonl, sd_runs.md, sd_runs.json,
#   gpu_step.json, gpu_step.md (the device call returns at most 8); everything else goes to a scratch folder in /tmp.
# Without CUDA every part still runs that can: the GPU parts say why they skip, and part 5 runs the same command
# lines on tiny random folders at 64 px, 1 particle, 2 steps: a CPU dry run that proves the command lines, e.g.
#   PYTHON=/work/twin/bin/python GPU_WHEELS=build/twin-wheels scripts/gpu_check.sh /tmp/gpu-dry
# Which pdray runs: the installed wheel's, in every part, the tests included. PYTHONSAFEPATH=1 keeps the working
# folder off sys.path and PYTHONPATH holds only the wheels' folder, so `import pdray` never finds this checkout's
# source tree: the tests (collected from tests/ here) check the very pdray that part 5 runs, and a wheel that lacks a
# module or a data file fails here rather than later. Part 2 says whether the wheel still matches the checkout's
# source (rerun scripts/gpu_wheels.sh if not). Variables: PYTHON (python3), GPU_WHEELS, GPU_CHECK_SECONDS (470),
# TORCH_EXTENSIONS_DIR (/tmp/pdray-torch-extensions: JIT builds, reused by a rerun on the same machine), MAX_JOBS (16).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-${OUT:-}}
[ -n "$out" ] || out=$(mktemp -d)
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2

main() {
  local budget=${GPU_CHECK_SECONDS:-470} # 8 minutes, less a margin for the last part's kill grace and the summary
  local end=$((SECONDS + budget))
  local python=${PYTHON:-python3}
  local wheels=${GPU_WHEELS:-build/gpu-wheels}
  local scratch site sd
  scratch=$(mktemp -d /tmp/pdray-gpu-check.XXXXXX)
  site=$scratch/site
  sd=$scratch/sd
  trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$scratch"' EXIT
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/pdray-torch-extensions} MAX_JOBS=${MAX_JOBS:-16}
  PATH="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null):$PATH" # its ninja
  local -a summary=()
  local failed=0
  # limit CAP [RESERVE]: the seconds a part may take, CAP or less so that RESERVE seconds stay for what follows
  limit() {
    local l=$((end - SECONDS - ${2:-0}))
    echo $((l < 1 ? 1 : l < $1 ? l : $1)) # never 0: `timeout 0` would mean no limit
  }
  note() { # note PART RESULT: one line of the final summary (FAILED counts toward the exit code)
    summary+=("$(printf '%-24s %s' "$1" "$2")")
    case $2 in FAILED*) failed=1 ;; esac
  }

  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), output in $out, budget ${budget} s"

  # ---------------------------------------------------------------------------------------------------- 1. preflight
  echo "== 1. preflight (20 s)"
  local pre_end=$((SECONDS + 20))
  if command -v nvidia-smi >/dev/null; then
    timeout -k 2 8 nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,compute_cap --format=csv ||
      echo "nvidia-smi failed (exit $?)"
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then
    echo "nvcc: $(timeout -k 2 5 nvcc --version | grep -i release)"
  else
    echo "nvcc: not found (nvdiffrast and nerfacc cannot JIT-build their CUDA code)"
  fi
  df -h "$PWD" /tmp | awk '{print "disk: " $0}'
  timeout -k 2 $((pre_end - SECONDS > 3 ? pre_end - SECONDS : 3)) "$python" - "$wheels" "$scratch/mode" <<'PY'
"""Versions and what this machine has; exit 2 naming what is missing when the check cannot go on."""
import importlib.metadata as metadata
import importlib.util
import platform
import sys
from pathlib import Path

wheels, mode_file = Path(sys.argv[1]), Path(sys.argv[2])
print(f"python        {platform.python_version()} ({sys.executable})")
problems = []
if sys.version_info < (3, 11):
    problems.append(f"python {platform.python_version()} is older than 3.11 (PYTHONSAFEPATH keeps the checkout off sys.path)")
essential = ["torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "peft", "accelerate", "typer",
             "yaml", "numpy", "PIL", "imageio", "matplotlib", "tqdm"]
useful = {"pytest": "the parity tests (part 4) skip", "rich": "nerfacc does not import", "pip": "wheels are unzipped",
          "ninja": "nvdiffrast and nerfacc cannot JIT-build"}
dists = {"yaml": "pyyaml", "PIL": "pillow", "huggingface_hub": "huggingface-hub"}
for name in essential + list(useful):
    if importlib.util.find_spec(name) is None:
        if name in useful:
            print(f"{name:<13} MISSING: {useful[name]}")
        else:
            problems.append(f"{name} is not installed")
            print(f"{name:<13} MISSING")
        continue
    try:
        version = metadata.version(dists.get(name, name))
    except metadata.PackageNotFoundError:
        version = "installed"
    print(f"{name:<13} {version}")
mode, arch = "cpu", ""
try:
    import torch

    print(f"torch cuda    {torch.version.cuda} (built for), available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        mode = "gpu"
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
        free, total = torch.cuda.mem_get_info()
        print(f"gpu           {torch.cuda.get_device_name()}, sm {arch}, {torch.cuda.device_count()} device(s), "
              f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
except Exception as error:
    problems.append(f"torch does not import ({type(error).__name__}: {error})")
found = sorted(wheels.glob("*.whl"))
if not found:
    problems.append(f"{wheels} holds no wheels: run scripts/gpu_wheels.sh (and carry build/gpu-wheels)")
elif not any(w.name.startswith("pdray-") for w in found):
    problems.append(f"{wheels} holds no pdray wheel: rerun scripts/gpu_wheels.sh")
else:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wrong = [w.name for w in found if "-cp3" in w.name and f"-{tag}-" not in w.name]
    if wrong:
        problems.append(f"{wheels} has wheels for another python than {tag} ({wrong[0]}): rerun scripts/gpu_wheels.sh "
                        f"with WHEELS_PYTHON_VERSION={sys.version_info.major}.{sys.version_info.minor}")
    print(f"wheels        {len(found)} in {wheels}, {sum(w.stat().st_size for w in found) / 2**20:.1f} MiB")
if problems:
    print("STOP: " + "; ".join(problems))
    sys.exit(2)
mode_file.write_text(f"mode={mode}\narch={arch}\n")
print(f"mode          {mode}" + ("" if mode == "gpu" else ": no CUDA, so a CPU dry run (GPU parts skip)"))
PY
  local rc=$?
  if [ $rc -ne 0 ] || [ ! -f "$scratch/mode" ]; then
    [ $rc -eq 124 ] && echo "STOP: the preflight did not finish in 20 s (torch import or CUDA init hangs?)"
    echo "== stopped after the preflight (exit $rc): nothing else can run here"
    return 2
  fi
  local mode arch
  mode=$(sed -n 's/^mode=//p' "$scratch/mode")
  arch=$(sed -n 's/^arch=//p' "$scratch/mode")
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} # JIT builds for this GPU only
  note "1. preflight" "ok, $mode mode"

  # ------------------------------------------------------------------------------------------------------ 2. install
  echo "== 2. install $wheels into $site (no network, no deps)"
  local t0=$SECONDS
  if "$python" -m pip --version >/dev/null 2>&1; then
    timeout -k 5 "$(limit 60)" "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --target "$site" "$wheels"/*.whl
  else
    echo "no pip: unzipping the wheels instead"
    timeout -k 5 "$(limit 60)" "$python" -c '
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$site" "$wheels"/*.whl
  fi
  rc=$?
  [ -n "${PYTHONPATH:-}" ] && echo "(the inherited PYTHONPATH=$PYTHONPATH is dropped)"
  export PYTHONPATH=$site
  timeout -k 5 "$(limit 60)" "$python" - "$site" "$wheels" <<'PY'
"""Every package of the wheels imports from the install folder, pdray's Ray-free path imports without Ray or W&B,
and the pdray wheel is (or is not) this checkout's source."""
import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path

site, wheels = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
bad = []
for wheel in sorted(wheels.glob("*.whl")):
    tops = {n.split("/")[0].removesuffix(".py") for n in zipfile.ZipFile(wheel).namelist()}
    tops = {t.split(".")[0] for t in tops if not t.endswith((".dist-info", ".data")) and not t.startswith("__")}
    for top in sorted(tops):
        spec = importlib.util.find_spec(top)
        where = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve() if spec else None
        if where is None or site not in where.parents:
            bad.append(f"{top} ({wheel.name}) resolves to {where}")
print(f"wheel packages: {'all import from ' + str(site) if not bad else 'NOT from the install folder: ' + '; '.join(bad)}")
ray_free = ["pdray.configs", "pdray.cli.main", "pdray.run.local_executor", "pdray.run.mesh_stage",
            "pdray.priors.random_sd", "pdray.evaluation.evaluate", "pdray.render.occupancy", "pdray.backends"]
for name in ray_free:
    importlib.import_module(name)
import pdray
import pdray.configs

configs = sorted(p.stem for p in Path(pdray.configs.__file__).parent.glob("*.yaml"))
print(f"pdray {pdray.__file__}; configs {configs}")
heavy = [m for m in ("ray", "wandb") if m in sys.modules]
print(f"Ray-free path imports ({len(ray_free)} modules): " + (f"PULLS IN {heavy}" if heavy else "no ray, no wandb"))
package = Path(pdray.__file__).parent
checkout = {"": Path("pdray"), "cli": Path("cli"), "configs": Path("configs")}
stale = []
for sub, source in checkout.items():
    for path in sorted(source.rglob("*")):
        if path.suffix not in {".py", ".yaml", ".json"} or "__pycache__" in path.parts:
            continue
        if sub == "" and path.relative_to(source).parts[0] in ("cli", "configs"):
            continue
        installed = package / sub / path.relative_to(source)
        if not installed.exists() or installed.read_bytes() != path.read_bytes():
            stale.append(str(path))
print("pdray wheel: " + ("the checkout's source, file for file" if not stale else
      f"STALE, {len(stale)} files differ from the checkout ({', '.join(stale[:4])}...): rerun scripts/gpu_wheels.sh"))
sys.exit(3 if bad or heavy else 4 if stale else 0)
PY
  local check=$?
  if [ $rc -ne 0 ] || ! { [ $check -eq 0 ] || [ $check -eq 3 ] || [ $check -eq 4 ]; }; then
    echo "== stopped: the wheels did not install or pdray does not import from them (install $rc, check $check)"
    note "2. install" "FAILED (install exit $rc, import check exit $check)"
    printf '%s\n' "${summary[@]}"
    return 1
  fi
  case $check in
  0) note "2. install" "ok in $((SECONDS - t0)) s" ;;
  3) note "2. install" "FAILED: a package comes from outside the wheels, or the Ray-free path imports ray/wandb" ;;
  4) note "2. install" "ok in $((SECONDS - t0)) s, but the pdray wheel is STALE (rerun scripts/gpu_wheels.sh)" ;;
  esac

  # SD 2.1-shaped random folders for part 5, built now (on the GPU, in the background while parts 3 and 4 run).
  local size=tiny
  [ "$mode" = gpu ] && size=full
  mkdir -p "$sd"
  local -a sd_pids=()
  for base in prior lora; do
    timeout -k 10 "$(limit 200 60)" "$python" -m pdray.priors.random_sd "$sd/$base" --size $size --base $base \
      >"$scratch/random_sd-$base.log" 2>&1 &
    sd_pids+=($!)
  done
  local sd_started=$SECONDS

  # ----------------------------------------------------------------------------------------------------- 3. backends
  echo "== 3. CUDA extensions, each by its real try (in parallel, at most 150 s)"
  cat >"$scratch/try.py" <<'PY'
import json, sys, time
t = time.perf_counter()
from pdray.backends import cuda_extension_unavailable_reason
reason = cuda_extension_unavailable_reason(sys.argv[1])
print(json.dumps({"backend": sys.argv[1], "available": reason is None, "reason": reason,
                  "seconds": round(time.perf_counter() - t, 1)}))
PY
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null # a build killed in an earlier run leaves its lock
  local cap
  cap=$(limit 150 240)
  local -a try_pids=()
  for name in tinycudann nvdiffrast nerfacc; do
    timeout -k 5 "$cap" "$python" "$scratch/try.py" $name >"$scratch/try-$name.json" 2>"$scratch/try-$name.log" &
    try_pids+=($!)
  done
  local -a disabled=()
  local i=0 ok_backends=""
  for name in tinycudann nvdiffrast nerfacc; do
    wait "${try_pids[$i]}"
    rc=$?
    i=$((i + 1))
    if [ $rc -ne 0 ] || ! [ -s "$scratch/try-$name.json" ]; then
      local why="its try did not finish (exit $rc)"
      [ $rc -eq 124 ] && why="its try did not finish in $cap s (timeout)"
      printf '{"backend": "%s", "available": false, "reason": "%s", "seconds": null}\n' $name "$why" \
        >"$scratch/try-$name.json"
    fi
    "$python" -c 'import json, sys
r = json.load(open(sys.argv[1]))
seconds = "" if r["seconds"] is None else " (%s s)" % r["seconds"]
print("%-11s %s%s" % (r["backend"], "AVAILABLE" if r["available"] else "unavailable: " + r["reason"], seconds))' \
      "$scratch/try-$name.json"
    if grep -q '"available": true' "$scratch/try-$name.json"; then
      ok_backends+=" $name"
    elif grep -q -e "failed its try" -e "did not finish" "$scratch/try-$name.json"; then
      disabled+=("$name") # a broken build or kernel: the later parts must not spend time on it again
      [ -s "$scratch/try-$name.log" ] && tail -n 12 "$scratch/try-$name.log" | sed "s/^/  $name| /"
    fi
  done
  "$python" -c 'import json, sys; json.dump([json.load(open(p)) for p in sys.argv[2:]], open(sys.argv[1], "w"), indent=2)' \
    "$out/backends.json" "$scratch"/try-{tinycudann,nvdiffrast,nerfacc}.json
  if [ ${#disabled[@]} -gt 0 ]; then
    export PDRAY_DISABLE_BACKENDS
    PDRAY_DISABLE_BACKENDS=$(
      IFS=,
      echo "${disabled[*]}"
    )
    echo "PDRAY_DISABLE_BACKENDS=$PDRAY_DISABLE_BACKENDS for the later parts (their tries failed or hung above)"
  fi
  "$python" -c '
import torch
from pdray.geometry.hashgrid import encoding_backend_name
from pdray.render.occupancy import march_backend_name
from pdray.render.raster import backend_name
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
picks = (encoding_backend_name("auto"), backend_name("auto", device), march_backend_name("auto", device))
print("auto picks: hash grid %s, rasteriser %s, marcher %s" % picks)' || echo "auto picks: could not ask (exit $?)"
  if [ "$mode" = gpu ]; then
    note "3. backends" "available:${ok_backends:- none}; unavailable: $(grep -ho '"backend": "[a-z]*", "available": false' "$scratch"/try-*.json | cut -d'"' -f4 | xargs)"
  else
    note "3. backends" "skipped: CUDA is not available (no extension imported)"
  fi

  # ------------------------------------------------------------------------------------------------- 4. parity tests
  echo "== 4. parity tests"
  if ! "$python" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed: parity tests not run"
    note "4. parity tests" "skipped: pytest is not installed"
  else
    local -a files=()
    for f in tests/test_backends.py tests/test_hashgrid.py tests/test_raster.py tests/test_occupancy.py; do
      if [ -f "$f" ]; then files+=("$f"); else echo "($f is not in this checkout)"; fi
    done
    cap=$(limit 150 200)
    if [ "$cap" -lt 20 ]; then
      note "4. parity tests" "not run: out of time"
    else
      PDRAY_PARITY_OUT="$out" timeout -k 10 "$cap" "$python" -m pytest -q -rs -p no:cacheprovider "${files[@]}"
      rc=$?
      echo "parity pytest exit code $rc"
      local result="ok"
      [ $rc -eq 0 ] || result="FAILED (pytest exit $rc$([ $rc -eq 124 ] && echo ", timeout after $cap s"))"
      note "4. parity tests" "$result; $(grep -c . "$out/parity.jsonl" 2>/dev/null || echo 0) parity records"
      cap=$(limit 90 180)
      if [ "$cap" -lt 20 ]; then
        note "4. replica parity" "not run: out of time"
      else
        timeout -k 10 "$cap" "$python" -m pytest -q -rs -p no:cacheprovider tests/test_replicas.py
        rc=$?
        echo "replica parity pytest exit code $rc"
        [ $rc -eq 0 ] && note "4. replica parity" "ok" || note "4. replica parity" "FAILED (pytest exit $rc)"
      fi
    fi
  fi
  echo "parity numbers:"
  cat "$out/parity.jsonl" 2>/dev/null || echo "none recorded (every parity test skipped or failed before recording)"

  # -------------------------------------------------------------------------------------------------- 5. pdray runs
  local steps=3
  local -a grid=("1 64" "1 512" "2 64" "2 512" "4 64" "4 512") # cheapest first per particle count
  if [ "$mode" = gpu ]; then
    echo "== 5. pdray run on SD 2.1-shaped random weights: 1, 2, 4 particles at 64 and 512 px, $steps steps each"
  else
    steps=2
    grid=("1 64")
    echo "== 5. pdray run, CPU DRY RUN: tiny random SD folders, 1 particle at 64 px, $steps steps (proves the commands)"
  fi
  local sd_ok=1
  for i in 0 1; do
    wait "${sd_pids[$i]}"
    rc=$?
    local base=prior
    [ $i -eq 1 ] && base=lora
    if [ $rc -ne 0 ]; then
      sd_ok=0
      echo "random_sd --base $base failed (exit $rc$([ $rc -eq 124 ] && echo ", timeout")):"
      tail -n 15 "$scratch/random_sd-$base.log" | sed 's/^/  | /'
    fi
  done
  echo "random SD folders ($size): $([ $sd_ok -eq 1 ] && echo "built" || echo "FAILED") $(du -sh "$sd" | cut -f1), ready $((SECONDS - sd_started)) s after their start"
  local rows=$scratch/rows.tsv
  local -A too_big=()
  : >"$rows"
  local entry='import atexit, sys
atexit.register(lambda: print("pdray-check imported:", sorted(m for m in ("ray", "wandb") if m in sys.modules), file=sys.stderr))
from pdray.cli.main import app
sys.argv[0] = "pdray"
app()'
  for cell in "${grid[@]}"; do
    read -r particles resolution <<<"$cell"
    local run=$scratch/runs/p$particles-r$resolution
    mkdir -p "$scratch/runs"
    local -a cmd=(run --config prolificdreamer --executor local --wandb off --stages nerf --particles "$particles"
      --steps "$steps" --out "$run" --set prior.model="$sd/prior" --set lora.base="$sd/lora"
      --set nerf.resolution="$resolution" --set eval_views=1 --set checkpoint_every=1000 --set log_every=1)
    if [ "$mode" = gpu ]; then cap=$(limit 150 25); else cap=$(limit 450 10); fi # the dry run's one run: the rest
    if [ $sd_ok -eq 0 ]; then
      printf '%s\t%s\t%s\t%s\t%s\n' "$particles" "$resolution" "skip" 0 "the random SD folders failed to build" >>"$rows"
      continue
    fi
    if [ "$cap" -lt 30 ]; then
      printf '%s\t%s\t%s\t%s\t%s\n' "$particles" "$resolution" "skip" 0 "not run: out of time" >>"$rows"
      continue
    fi
    if [ -n "${too_big[$resolution]:-}" ]; then # more particles at a resolution that already did not fit
      printf '%s\t%s\t%s\t%s\t%s\n' "$particles" "$resolution" "skip" 0 "not run: ${too_big[$resolution]}" >>"$rows"
      continue
    fi
    echo "-- pdray ${cmd[*]}   (timeout $cap s)"
    t0=$SECONDS
    timeout -k 15 "$cap" "$python" -c "$entry" "${cmd[@]}" >"$run.log" 2>&1
    rc=$?
    grep -E '^pdray-check imported:' "$run.log" || true
    printf '%s\t%s\t%s\t%s\t%s\n' "$particles" "$resolution" "$rc" "$((SECONDS - t0))" "$run" >>"$rows"
    if [ $rc -ne 0 ] && grep -q -e OutOfMemoryError -e "CUDA out of memory" "$run.log"; then
      too_big[$resolution]="$particles particle(s) at $resolution px ran out of GPU memory"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      too_big[$resolution]="$particles particle(s) at $resolution px did not finish in $cap s"
    fi
    if [ $rc -eq 0 ]; then
      echo "   ok in $((SECONDS - t0)) s"
    else
      echo "   exit $rc after $((SECONDS - t0)) s; the end of its log:"
      tr '\r' '\n' <"$run.log" | grep -v '^\s*$' | tail -n 12 | cut -c1-240 | sed 's/^/  | /'
    fi
  done
  "$python" - "$rows" "$out" "$mode" "$steps" "$cap" <<'PY'
"""sd_runs.json and sd_runs.md: one row per (particles, resolution), its seconds per step and peak memory, or why not."""
import json
import sys
from pathlib import Path

rows_file, out, mode, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows = []
for line in rows_file.read_text().splitlines():
    particles, resolution, rc, seconds, where = line.split("\t")
    row = {"particles": int(particles), "resolution": int(resolution), "steps": steps, "wall_s": int(seconds)}
    if rc == "skip":
        rows.append({**row, "status": "not run", "reason": where})
        continue
    run, rc = Path(where), int(rc)
    log = Path(f"{run}.log").read_text(errors="replace") if Path(f"{run}.log").exists() else ""
    imported = next((ln.split(":", 1)[1].strip() for ln in log.splitlines() if ln.startswith("pdray-check imported:")), None)
    if imported is not None:
        row["ray_or_wandb_imported"] = imported
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        summary = None
    if rc != 0 and ("OutOfMemoryError" in log or "CUDA out of memory" in log):
        row |= {"status": "out of memory", "reason": "CUDA out of memory"}
    elif rc in (124, 137):
        row |= {"status": "timeout", "reason": f"killed by its timeout after {seconds} s"}
    elif rc != 0 or summary is None:
        last = [ln for ln in log.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
        row |= {"status": "failed", "reason": f"exit {rc}: " + (last[-1][:300] if last else "no output")}
    if summary is not None:
        times = summary.get("time_per_step_s") or {}
        memory = summary.get("memory") or {}
        metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
                   if ln.strip()] if (run / "metrics.jsonl").exists() else []
        later = [m["time/step"] for m in metrics if m.get("step", 0) > 1 and "time/step" in m]
        gpu_mb, rss_mb = memory.get("peak_gpu_mb"), memory.get("peak_rss_mb")
        row |= {
            "s_per_step": times.get("step"),
            "s_per_step_after_first": sum(later) / len(later) if later else None,
            "steps_per_s": summary.get("steps_per_s"),
            "peak_gpu_gb": gpu_mb / 1024 if gpu_mb is not None else None,
            "peak_rss_gb": rss_mb / 1024 if rss_mb is not None else None,
            "startup_s": summary.get("startup_s"),
            "recoveries": summary.get("recoveries"),
            "time_per_step_s": times,
        }
        row.setdefault("status", "ok")
    rows.append(row)
rows.sort(key=lambda r: (r["resolution"], r["particles"]))
title = ("pdray run, SD 2.1-shaped random weights on the GPU" if mode == "gpu" else
         "CPU DRY RUN: tiny random SD folders (the command lines, not the numbers)")
report = {"mode": mode, "title": title, "rows": rows}
(out / "sd_runs.json").write_text(json.dumps(report, indent=2))


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


lines = [f"# {title}", "",
         "`pdray run --config prolificdreamer --executor local --wandb off --stages nerf --particles P --steps "
         f"{steps} --set nerf.resolution=R --set eval_views=1 ...`; s/step is summary.json's mean (the first step "
         "warms up); later is the mean of steps 2 on (metrics.jsonl).", "",
         "| particles | resolution | status | s/step | s/step later | steps/s | peak GPU GB | peak RSS GB | wall s | reason |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    cells = [r["particles"], r["resolution"], r["status"], fmt(r.get("s_per_step"), 3),
             fmt(r.get("s_per_step_after_first"), 3), fmt(r.get("steps_per_s"), 3), fmt(r.get("peak_gpu_gb")),
             fmt(r.get("peak_rss_gb")), r["wall_s"], r.get("reason", "")]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
(out / "sd_runs.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
bad = [r for r in rows if r["status"] == "failed" or r.get("ray_or_wandb_imported") not in (None, "[]")]
sys.exit(1 if bad else 0)
PY
  rc=$?
  local counts
  counts=$("$python" -c 'import json, sys, collections
rows = json.load(open(sys.argv[1]))["rows"]
print(", ".join(f"{n} {s}" for s, n in collections.Counter(r["status"] for r in rows).items()))' "$out/sd_runs.json" 2>/dev/null)
  local label="5. pdray runs"
  [ "$mode" = gpu ] || label="5. pdray runs (CPU dry)"
  if [ $rc -eq 0 ]; then note "$label" "${counts:-no rows}"; else note "$label" "FAILED: ${counts:-no table} (a run errored or imported ray/wandb)"; fi

  # --------------------------------------------------------------------------------------------------- 6. gpu_step
  echo "== 6. benchmarks/gpu_step.py (512 px, fp16, 1, 2, 4 particles)"
  if [ "$mode" != gpu ]; then
    echo "skipped: CUDA is not available"
    note "6. gpu_step" "skipped: CUDA is not available"
  elif [ ! -f benchmarks/gpu_step.py ]; then
    note "6. gpu_step" "skipped: benchmarks/gpu_step.py is not in this checkout"
  else
    cap=$(limit 600 15)
    if [ "$cap" -lt 60 ]; then
      echo "skipped: ${cap} s left"
      note "6. gpu_step" "not run: out of time (${cap} s left)"
    else
      local -a reuse=()
      [ $sd_ok -eq 1 ] && reuse=(--prior-dir "$sd") # the folders of part 5
      timeout -k 10 "$cap" "$python" benchmarks/gpu_step.py --resolution 512 --dtype fp16 --particles 1,2,4 \
        "${reuse[@]}" --out "$out"
      rc=$?
      echo "gpu_step exit code $rc (time left was $cap s)"
      case $rc in
      0) note "6. gpu_step" "ok" ;;
      124 | 137) note "6. gpu_step" "timeout after $cap s (partial lines above)" ;;
      *) note "6. gpu_step" "FAILED (exit $rc)" ;;
      esac
    fi
  fi

  # ---------------------------------------------------------------------------------------------------- summary
  echo "== summary ($mode mode, ${SECONDS} s)"
  printf '%s\n' "${summary[@]}"
  echo "files in $out:" "$(cd "$out" && echo *)"
  return $failed
}

main "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
