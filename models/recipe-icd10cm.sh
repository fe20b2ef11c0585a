#!/usr/bin/env bash
# Builds the embedded default student: an ICD-10-CM coding student, distilled by this project.
#
#   1. dataset: ICD-10-CM descriptions and inclusion terms -> billable codes, in a short chat
#      format; one inclusion term per code held out; the training phrases augmented by the
#      classification's conventions and sibling substitution, never into a held-out phrase
#      (distill-serve recipe icd10cm-data --augment-per-code);
#   2. teacher: a larger student with a BPE tokenizer trained on that text, fine-tuned on the
#      training pairs (distill-serve train), and scored on the held-out terms;
#   3. student: a smaller random student, served by one distill-serve while a second serves the
#      teacher; two refresh jobs from the same random version on the same budget distil it
#      (sequence-level KD on the teacher's answers): black-box only, then, after a rollback,
#      with white-box terms from the teacher's checkpoint (hidden states and attention maps of
#      its last layers);
#   4. each candidate is scored on the held-out terms (without and with the terminology
#      constraint); the one with the higher agreement on its job's own evaluation split (never
#      the held-out terms) becomes $OUT/1 (INT8 ONNX + its checkpoint) with its held-out
#      evaluation ($OUT/eval.json); $OUT/ablation.json holds the teacher's and both candidates'.
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
    prefixes="" vocab=320 augment=2 white_box_layers=1
    teacher_dims=(--hidden-size 64 --intermediate-size 128 --num-layers 2 --num-heads 4 --num-kv-heads 2)
    student_dims=(--hidden-size 32 --intermediate-size 64 --num-layers 1 --num-heads 2 --num-kv-heads 1)
    teacher_steps=20 student_steps=10 batch=8 eval_limit=20
    # A few steps prove the pipeline, not a better student: any candidate passes.
    gate='{"min_agreement_gain": -1.0, "max_kl_ratio": 1000.0}' ;;
  demo)
    prefixes="E,I,J" vocab=2048 augment=8 white_box_layers=3
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
"$bin" recipe icd10cm-data --xml "$xml" --out "$work/data" --prefixes "$prefixes" --seed "$seed" \
  --augment-per-code "$augment" >"$work/data.json"
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
# The student's server holds the teacher too, with its checkpoint: the white-box job reads it.
mkdir -p "$work/student-repo"
cp -r "$work/teacher-repo/teacher" "$work/student-repo/teacher"
cp -r "$work/teacher" "$work/student-repo/teacher/1/checkpoint"

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

export DISTILL_SERVE_ADMIN_TOKEN=$token
# A fixed sample across the chapters, which tests/default_student.rs scores.
awk 'NR % 16 == 1' "$work/data/heldout.jsonl" >"$work/heldout-sample.jsonl"
evaluate() { # addr model name
  DISTILL_SERVE_URL="http://$1" "$bin" distill eval --model "$2" --data "$work/data/heldout.jsonl" \
    --terminology icd10cm --max-tokens 12 --limit "$eval_limit" >"$work/eval-$3.json"
  DISTILL_SERVE_URL="http://$1" "$bin" distill eval --model "$2" --data "$work/heldout-sample.jsonl" \
    --terminology icd10cm --max-tokens 12 >"$work/eval-sample-$3.json"
}
log "teacher evaluation on the held-out inclusion terms"
evaluate "$teacher_addr" teacher teacher

export DISTILL_SERVE_URL="http://$student_addr"
"$bin" distill upload icd10cm-train "$work/data/train.jsonl" >&2
job() { # name white_box-json
  cat >"$work/job-$1.json" <<EOF
{
  "dataset": "icd10cm-train",
  "teacher": {"url": "http://$teacher_addr/v1", "model": "teacher", "mode": "sequence",
              "max_tokens": 12, "temperature": 0.0, "concurrency": 4},
  "train": {"steps": $student_steps, "batch_size": $batch, "learning_rate": 0.002, "warmup_steps": 50,
            "nice": 0, "threads": 2, "seed": $seed},
  "gate": $gate,
  "eval_fraction": 0.1,
  "terminology": "icd10cm",
  "eval_max_new_tokens": 12,
  "white_box": $2
}
EOF
  "$bin" distill refresh default "$work/job-$1.json" >"$work/refresh-$1.json"
  log "evaluation of the $1 student on the held-out inclusion terms"
  evaluate "$student_addr" default "$1"
}
log "distillation, black-box: $student_steps steps of sequence-level KD from the teacher"
job black-box null
"$bin" distill rollback default >&2
log "distillation, white-box: the same budget from the same version, + the teacher's last $white_box_layers layers"
job white-box '{"teacher_model": "teacher", "layers": '"$white_box_layers"'}'

# The job's own evaluation split decides, never the held-out terms.
agreement() { jq '.result.evaluation.candidate.agreement' "$work/refresh-$1.json"; }
chosen=black-box
if jq -en --argjson b "$(agreement black-box)" --argjson w "$(agreement white-box)" '$w > $b' >/dev/null; then
  chosen=white-box
fi
version=$(jq '.result.version' "$work/refresh-$chosen.json")
jq -n --arg chosen "$chosen" --slurpfile d "$work/data.json" --slurpfile t "$work/eval-teacher.json" \
  --slurpfile b "$work/eval-black-box.json" --slurpfile w "$work/eval-white-box.json" \
  --slurpfile rb "$work/refresh-black-box.json" --slurpfile rw "$work/refresh-white-box.json" \
  '{chosen: $chosen, dataset: $d[0], teacher: $t[0],
    "black-box": {job_evaluation: $rb[0].result.evaluation, held_out: $b[0]},
    "white-box": {job_evaluation: $rw[0].result.evaluation, held_out: $w[0]}}' >"$work/ablation.json"

rm -rf "$out/1"
mkdir -p "$out"
cp -r "$work/student-repo/default/$version" "$out/1"
[ -f "$out/model.toml" ] || echo 'name = "default"' >"$out/model.toml"
cp "$work/eval-$chosen.json" "$out/eval.json"
cp "$work/eval-sample-$chosen.json" "$out/eval-sample.json"
cp "$work/heldout-sample.jsonl" "$out/heldout-sample.jsonl"
cp "$work/ablation.json" "$out/ablation.json"
log "wrote $out/1 (version $version, the $chosen student); evaluation:"
cat "$out/eval.json"
