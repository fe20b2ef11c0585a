#!/usr/bin/env bash
# Builds the embedded default student: an ICD-10-CM coding student, distilled by this project.
#
#   1. dataset: ICD-10-CM descriptions and inclusion terms -> billable codes, in a short chat
#      format; one inclusion term per code held out (distill-serve recipe icd10cm-data);
#   2. teacher: a larger student with a BPE tokenizer trained on that text, fine-tuned on the
#      training pairs (distill-serve train);
#   3. student: a smaller random student, served by one distill-serve while a second serves the
#      teacher; a refresh job distils it (sequence-level KD on the teacher's answers) and swaps
#      in the result (distill-serve distill refresh);
#   4. the promoted version (INT8 ONNX + its checkpoint) becomes $OUT/1, and the held-out
#      evaluation (without and with the terminology constraint) goes to $OUT/eval.json.
#
# Seedable and bounded. SCALE=toy runs in seconds (a handful of codes, a few steps, for the
# test); SCALE=demo is what models/default holds (about an hour on 2 cores, see README).
# Environment: SCALE (demo|toy), SEED, ICD10CM_XML, OUT, WORK, DISTILL_SERVE_BIN,
# TEACHER_ADDR, STUDENT_ADDR (loopback host:port).
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${SCALE:-demo}
seed=${SEED:-0}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve
xml=${ICD10CM_XML:-$cache/icd10cm-2026/icd10cm_tabular_2026.xml}
out=${OUT:-models/default}
work=${WORK:-target/recipe-icd10cm}
bin=${DISTILL_SERVE_BIN:-target/release/distill-serve}
teacher_addr=${TEACHER_ADDR:-127.0.0.1:18090}
student_addr=${STUDENT_ADDR:-127.0.0.1:18091}
token=recipe-$RANDOM$RANDOM

case $scale in
  toy)
    prefixes="" vocab=320
    teacher_dims=(--hidden-size 64 --intermediate-size 128 --num-layers 2 --num-heads 4 --num-kv-heads 2)
    student_dims=(--hidden-size 32 --intermediate-size 64 --num-layers 1 --num-heads 2 --num-kv-heads 1)
    teacher_steps=20 student_steps=10 batch=8 eval_limit=20
    # A few steps prove the pipeline, not a better student: any candidate passes.
    gate='{"min_agreement_gain": -1.0, "max_kl_ratio": 1000.0}' ;;
  demo)
    prefixes="E,I,J" vocab=2048
    teacher_dims=(--hidden-size 256 --intermediate-size 704 --num-layers 4 --num-heads 4 --num-kv-heads 2)
    student_dims=(--hidden-size 192 --intermediate-size 512 --num-layers 3 --num-heads 4 --num-kv-heads 2)
    teacher_steps=3000 student_steps=2000 batch=32 eval_limit=671
    gate='{}' ;;
  *) echo "SCALE must be toy or demo" >&2; exit 2 ;;
esac
case $teacher_addr$student_addr in
  127.0.0.1:*127.0.0.1:*) ;;
  *) echo "TEACHER_ADDR and STUDENT_ADDR must be on 127.0.0.1" >&2; exit 2 ;;
esac

rm -rf "$work"
mkdir -p "$work"
started=$SECONDS
log() { echo "recipe [$((SECONDS - started)) s] $*" >&2; }

log "dataset from $xml"
"$bin" recipe icd10cm-data --xml "$xml" --out "$work/data" --prefixes "$prefixes" --seed "$seed" >"$work/data.json"
cat "$work/data.json" >&2

tiny() { # out seed dims...
  local dir=$1 s=$2; shift 2
  "$bin" tiny --family qwen2 --seed "$s" --out "$dir" --corpus "$work/data/corpus.txt" \
    --tokenizer-vocab-size "$vocab" --init-std 0.02 "$@" >&2
}

log "teacher: $teacher_steps steps"
tiny "$work/teacher-init" "$seed" "${teacher_dims[@]}"
printf '{"batch_size": %d, "learning_rate": 0.002, "warmup_steps": 50, "weight_decay": 0.01, "nice": 0, "threads": 2}\n' \
  "$batch" >"$work/teacher-train.json"
"$bin" train --checkpoint "$work/teacher-init" --data "$work/data/train.jsonl" --out "$work/teacher" \
  --config "$work/teacher-train.json" --steps "$teacher_steps" --seed "$seed"
mkdir -p "$work/teacher-repo/teacher"
echo 'name = "teacher"' >"$work/teacher-repo/teacher/model.toml"
"$bin" export --checkpoint "$work/teacher" --out "$work/teacher-repo/teacher/1" --int8 >/dev/null

log "student: random start"
mkdir -p "$work/student-repo/default/1"
# bf16, as the students users bring: the committed checkpoint stays small.
tiny "$work/student-repo/default/1/checkpoint" "$((seed + 1))" "${student_dims[@]}" --dtype bf16
"$bin" export --checkpoint "$work/student-repo/default/1/checkpoint" --out "$work/student-repo/default/1" --int8 >/dev/null
echo 'name = "default"' >"$work/student-repo/default/model.toml"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
serve() { # repo addr log
  "$bin" serve --model-repository "$1" --http-addr "$2" --grpc-addr 127.0.0.1:0 --admin-token "$token" \
    --store "$work/$(basename "$3" .log).sqlite3" --terminology "icd10cm=icd10cm-xml:$xml" >"$3" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do
    if curl -sf "http://$2/v2/health/ready" >/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server on $2 did not start; see $3" >&2
  exit 1
}
serve "$work/teacher-repo" "$teacher_addr" "$work/teacher.log"
serve "$work/student-repo" "$student_addr" "$work/student.log"

log "distillation: $student_steps steps of sequence-level KD from the teacher"
export DISTILL_SERVE_URL="http://$student_addr" DISTILL_SERVE_ADMIN_TOKEN=$token
"$bin" distill upload icd10cm-train "$work/data/train.jsonl" >&2
cat >"$work/job.json" <<EOF
{
  "dataset": "icd10cm-train",
  "teacher": {"url": "http://$teacher_addr/v1", "model": "teacher", "mode": "sequence",
              "max_tokens": 12, "temperature": 0.0, "concurrency": 4},
  "train": {"steps": $student_steps, "batch_size": $batch, "learning_rate": 0.002, "warmup_steps": 50,
            "nice": 0, "threads": 2, "seed": $seed},
  "gate": $gate,
  "eval_fraction": 0.1,
  "terminology": "icd10cm",
  "eval_max_new_tokens": 12
}
EOF
"$bin" distill refresh default "$work/job.json" >"$work/refresh.json"

log "evaluation on the held-out inclusion terms"
"$bin" distill eval --model default --data "$work/data/heldout.jsonl" --terminology icd10cm \
  --max-tokens 12 --limit "$eval_limit" >"$work/eval.json"

version=$(ls "$work/student-repo/default" | grep -E '^[0-9]+$' | sort -n | tail -1)
rm -rf "$out/1"
mkdir -p "$out"
cp -r "$work/student-repo/default/$version" "$out/1"
[ -f "$out/model.toml" ] || echo 'name = "default"' >"$out/model.toml"
cp "$work/eval.json" "$out/eval.json"
# A fixed sample across the chapters, which tests/default_student.rs scores.
awk 'NR % 16 == 1' "$work/data/heldout.jsonl" >"$out/heldout-sample.jsonl"
"$bin" distill eval --model default --data "$out/heldout-sample.jsonl" --terminology icd10cm \
  --max-tokens 12 >"$out/eval-sample.json"
log "wrote $out/1 (version $version of the refresh); evaluation:"
cat "$work/eval.json"
