#!/usr/bin/env bash
# Builds the README's encoder students from data this project generates:
#
#   icd-chapters: a BERT sequence classifier of the 22 ICD-10-CM chapters, trained on the
#     descriptions and inclusion terms of billable codes (CMS tabular XML); one category in five
#     is held out whole, so held-out phrases name codes it never saw;
#   ner-zh-en: an XLM-RoBERTa token classifier of companies, amounts and dates in Chinese,
#     English and mixed sentences from templates; held out: company names it never saw (with
#     the training templates, and again with sentence templates it never saw).
#
# Each: dataset (distill-serve recipe), a random student with a tokenizer trained on the
# training text (tiny), training with held-out scores before and after (train), an INT8 export
# into $OUT/<name>/1, and the served INT8 model scored over HTTP (models/eval_encoder.py).
# Reports go to $OUT/<name>/report.json. SCALE=toy runs in seconds (the test); SCALE=demo is
# what the README reports (minutes on 2 cores).
# Environment: SCALE (demo|toy), SEED, ICD10CM_XML, OUT, WORK, DISTILL_SERVE_BIN, ADDR.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=${SCALE:-demo}
seed=${SEED:-0}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve
xml=${ICD10CM_XML:-$cache/icd10cm-2026/icd10cm_tabular_2026.xml}
out=${OUT:-target/encoder-students}
work=${WORK:-target/recipe-encoders}
bin=${DISTILL_SERVE_BIN:-target/release/distill-serve}
addr=${ADDR:-127.0.0.1:18092}
case $addr in 127.0.0.1:*) ;; *) echo "ADDR must be on 127.0.0.1" >&2; exit 2 ;; esac

case $scale in
  toy)
    icd_size=(--max-train 300 --max-held-out 60) ner_size=(--train 300 --held-out 60)
    dims=(--hidden-size 32 --intermediate-size 64 --num-layers 1 --num-heads 2)
    steps=20 vocab=600 ;;
  demo)
    icd_size=(--max-train 50000 --max-held-out 2000) ner_size=(--train 8000 --held-out 500)
    dims=(--hidden-size 128 --intermediate-size 512 --num-layers 3 --num-heads 4)
    steps=2000 vocab=3000 ;;
  *) echo "SCALE must be toy or demo" >&2; exit 2 ;;
esac

rm -rf "$work" "$out"
mkdir -p "$work" "$out"
started=$SECONDS
log() { echo "recipe [$((SECONDS - started)) s] $*" >&2; }
config='{"steps": '$steps', "batch_size": 32, "learning_rate": 0.002, "warmup_steps": 50, "threads": 2, "nice": 0, "seed": '$seed'}'
echo "$config" >"$work/train.json"

student() { # name family head
  local name=$1 family=$2 head=$3 data=$work/$1/data
  log "$name: student ($family, $head)"
  "$bin" tiny --family "$family" --bert-head "$head" --labels "$(cat "$data/labels.txt")" \
    --corpus "$data/corpus.txt" --tokenizer-vocab-size "$vocab" "${dims[@]}" --seed "$seed" \
    --out "$work/$name/random" >&2
  log "$name: training $steps steps"
  "$bin" train --checkpoint "$work/$name/random" --data "$data/train.jsonl" \
    --held-out "$data/heldout.jsonl" --config "$work/train.json" --out "$work/$name/trained" >"$work/$name/train.json"
  "$bin" export --checkpoint "$work/$name/trained" --out "$out/$name/1" --int8 >&2
  echo "name = \"$name\"" >"$out/$name/model.toml"
}

log "datasets"
"$bin" recipe icd-chapters --xml "$xml" --out "$work/icd-chapters/data" --seed "$seed" "${icd_size[@]}" >&2
"$bin" recipe zh-en-entities --out "$work/ner-zh-en/data" --seed "$seed" "${ner_size[@]}" >&2
student icd-chapters bert sequence
student ner-zh-en xlm-roberta token

log "serving the INT8 exports on $addr"
"$bin" serve --model-repository "$out" --http-addr "$addr" --grpc-addr 127.0.0.1:0 >"$work/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  if curl -sf "http://$addr/v2/health/ready" >/dev/null; then break; fi
  sleep 0.1
done
served() { python3 models/eval_encoder.py "$addr" "$1" "$work/$1/data/$2"; }
for name in icd-chapters ner-zh-en; do
  {
    echo "{\"train\": $(cat "$work/$name/train.json"),"
    echo " \"served_int8\": $(served "$name" heldout.jsonl)"
    if [ -f "$work/$name/data/heldout-new-phrasing.jsonl" ]; then
      echo ", \"served_int8_new_phrasing\": $(served "$name" heldout-new-phrasing.jsonl)"
    fi
    echo "}"
  } >"$out/$name/report.json"
  log "$name: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: v for k, v in r.items() if k != "train"}))' "$out/$name/report.json")"
done
log "done: $out"
