#!/usr/bin/env bash
# The package as a new user meets it: `pip install` of a checkout into a fresh virtual environment, then, from an
# empty folder, the demo through the console command, the notebook API on a pair, and `--score_pair`.
#   bash bench/fresh_install.sh [CHECKOUT] [WORKDIR]     (defaults: this checkout, /tmp/speakerkit_fresh)
# Prints the install and demo seconds, the demo's first and last score.txt lines, and the pair's scores.
set -euo pipefail
checkout=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=${2:-/tmp/speakerkit_fresh}
rm -rf "$work" && mkdir -p "$work/elsewhere"
python3 -m venv "$work/venv"
start=$(date +%s)
"$work/venv/bin/pip" install --quiet --no-compile "$checkout"
echo "install seconds: $(( $(date +%s) - start ))"
"$work/venv/bin/pip" list 2>/dev/null | grep -i -E "^(torch|torchaudio|speakerkit) "
cd "$work/elsewhere"
start=$(date +%s)
"$work/venv/bin/speakerkit" --demo --save_path demo > demo.log 2>&1
echo "demo seconds: $(( $(date +%s) - start ))"
head -1 demo/score.txt
tail -1 demo/score.txt
a=$(ls demo/corpus/voxceleb/test/wav/id20000/session0/*.wav | head -1)
b=$(ls demo/corpus/voxceleb/test/wav/id20000/session1/*.wav | head -1)
"$work/venv/bin/python" -c "
import sys
from speakerkit import embed, load_model, score
model = load_model('demo/model/model_0007.model')
print('embedding', tuple(embed(model, sys.argv[1]).shape), 'score', round(score(model, *sys.argv[1:]), 4))
" "$a" "$b"
"$work/venv/bin/speakerkit" --score_pair "$a" "$b" --initial_model demo/model/model_0007.model
