#!/usr/bin/env bash
# VoxCeleb recipe: from the downloaded archives to Vox1-O/E/H results, stage by stage.
#
#   exps/voxceleb/run.sh [--data DIR] [--exp DIR] [--gpus N] [--stage A] [--stop_stage B] [--skip N]...
#   exps/voxceleb/run.sh --demo [--corpus DIR]     # the same stages on the generated demo corpus, on the CPU
#
# Stages (each runs only when A <= its number <= B and it is not --skip'ped; all are safe to re-run: finished
# work is skipped, and training continues from its resume.pt):
#   1 prepare   VoxCeleb2 m4a -> wav, train list, MUSAN 5 s chunks, RIR layout
#   2 check     trainECAPAModel.py --check_data over every list and folder; stops the recipe on problems
#   3 train     ECAPA-TDNN C=1024, AAM-softmax, 2 s crops, batch 400, 80 epochs (the original recipe):
#               conf/ecapa_tdnn.yaml
#   4 finetune  --large_margin from the last stage-3 checkpoint: 6 s crops, margin 0.5, 5 epochs:
#               conf/ecapa_tdnn_lm.yaml
#   5 eval      Vox1-O, Vox1-E, Vox1-H, each without and with AS-Norm (cohort from the VoxCeleb2 list):
#               conf/eval.yaml
# A stage's flags come from its config file; flags given after it (the data paths, --demo's smaller settings)
# override the file's.
#
# Expected time and GPU memory on one GPU: ESTIMATES. No GPU was lent to the sessions that wrote this recipe,
# so none of it is measured on one yet; each line says how it is estimated.
#   1 prepare   no GPU. CPU: ~8 min on 16 cores: this project's 2-core machine converts 8 s AAC files to wav at
#               154 files/s per core (python bench/bench_prepare.py), x 1,092,009 files / 16 cores. Writing the
#               ~265 GB of wav (2,300 h x 32 kB/s) is likely the bound: ~22 min at 200 MB/s. MUSAN (109 h)
#               and the RIRs add minutes.
#   2 check     no GPU. CPU: seconds (headers at 23,900 files/s per core, 2000 full decodes per source at 2,250
#               files/s, same bench, files in the page cache); on a cold disk the 1.25 M small reads dominate.
#   3 train     ~48 h, fits in 24 GB: the original ECAPA-TDNN code trains this configuration (C=1024, batch
#               400, 2 s crops, 80 epochs) in 37 min per epoch on one 24 GB RTX 3090 (TaoRuijie/ECAPA-TDNN's
#               README). Our loader is faster than the original's (bench/RESULTS.md): an upper estimate.
#   4 finetune  ~9 h, fits in 24 GB: each epoch has 3x stage 3's audio (6 s crops), so ~3 x 37 min x 5
#               epochs; a step holds 128 x 6 s of audio against stage 3's 400 x 2 s, so about the same memory.
#   5 eval      not estimated: embedding speed on a GPU is not measured here yet (bench/run_gpu.sh measures
#               it). It embeds the 153,516 VoxCeleb1 utterances once (E and H share them, O is a subset) and
#               20,000 cohort utterances; scoring and AS-Norm take minutes (python bench/bench_scoring.py).
# What a run really took is recorded: this script prints each stage's wall time and appends it to
# $exp/stage_times.txt, and every training run's metrics.jsonl has its peak GPU memory per epoch.
#
# Layout expected under --data (the official downloads, unpacked):
#   vox2_dev_aac/aac/idXXXXX/<video>/NNNNN.m4a    VoxCeleb2 dev
#   voxceleb1/wav/idXXXXX/<video>/NNNNN.wav       VoxCeleb1 dev + test
#   voxceleb1/{veri_test2,list_test_all2,list_test_hard2}.txt   Vox1-O, -E, -H (cleaned lists)
#   musan/{music,noise,speech}/...                RIRS_NOISES/simulated_rirs/...
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}

data=/data exp=exps/voxceleb/exp gpus=1 stage=1 stop_stage=5 demo=0 corpus= skip=" "
while [ $# -gt 0 ]; do
    case "$1" in
        --data) data=$2; shift ;;
        --exp) exp=$2; shift ;;
        --gpus) gpus=$2; shift ;;
        --stage) stage=$2; shift ;;
        --stop_stage) stop_stage=$2; shift ;;
        --skip) skip="$skip$2 "; shift ;;
        --demo) demo=1 ;;
        --corpus) corpus=$2; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$demo" = 1 ]; then
    [ "$exp" = exps/voxceleb/exp ] && exp=exps/voxceleb/demo
    corpus=${corpus:-$exp/corpus}
    voxceleb2_wav=$corpus/voxceleb/train/wav
    voxceleb1_wav=$corpus/voxceleb/test/wav
    trials=("$corpus/voxceleb/trials.txt")          # one held-out list stands for O, E and H
    musan=$corpus/musan_split
    rirs_source=$corpus/RIRS_NOISES
    # The recipe's configs, scaled down: given flags override a --config file's.
    train_flags=(--C 128 --max_epoch 2 --batch_size 32 --num_frames 150 --lr 0.002 --n_cpu 1)
    finetune_flags=(--C 128 --max_epoch 1 --num_frames 300 --batch_size 32 --n_cpu 1)
    eval_flags=(--n_cpu 1 --cohort_top_k 20)
else
    voxceleb2_wav=$data/voxceleb2/wav
    voxceleb1_wav=$data/voxceleb1/wav
    trials=("$data/voxceleb1/veri_test2.txt" "$data/voxceleb1/list_test_all2.txt" "$data/voxceleb1/list_test_hard2.txt")
    musan=$data/musan_split
    rirs_source=$data/RIRS_NOISES
    train_flags=()
    finetune_flags=()
    eval_flags=()
fi
train_list=$exp/data/train_list.txt
rirs=$exp/data/rirs
mkdir -p "$exp/data"
times=$exp/stage_times.txt

runs() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ] && [[ "$skip" != *" $1 "* ]]; }
started() { echo "== stage $1: $2 ($(date '+%F %T'))"; stage_start=$(date +%s); }
finished() {
    local seconds=$(( $(date +%s) - stage_start ))
    printf 'stage %s %-9s %6d s\n' "$1" "$2" "$seconds" | tee -a "$times"
}
train() {  # torchrun for several GPUs, one process otherwise
    if [ "$gpus" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$gpus" trainECAPAModel.py "$@"
    else
        "$PYTHON" trainECAPAModel.py "$@"
    fi
}
last_checkpoint() { ls "$1"/model/model_[0-9]*.model 2>/dev/null | sort | tail -1; }  # an epoch's, not the average

if [ "$demo" = 1 ] && runs 1; then
    [ -e "$corpus/COMPLETE" ] || "$PYTHON" -c "import demo, sys; demo.make_corpus(sys.argv[1])" "$corpus"
fi

if runs 1; then
    started 1 prepare
    if [ "$demo" = 0 ]; then
        "$PYTHON" prepare.py m4a "$data/vox2_dev_aac/aac" "$voxceleb2_wav"
        "$PYTHON" prepare.py musan "$data/musan" "$musan"
    fi
    "$PYTHON" prepare.py train_list "$voxceleb2_wav" "$train_list"
    "$PYTHON" prepare.py rirs "$rirs_source" "$rirs"
    finished 1 prepare
fi

data_flags=(--train_list "$train_list" --train_path "$voxceleb2_wav" --eval_path "$voxceleb1_wav"
            --musan_path "$musan" --rir_path "$rirs")

if runs 2; then
    started 2 check
    "$PYTHON" trainECAPAModel.py --check_data "${data_flags[@]}" --eval_list "${trials[@]}"
    finished 2 check
fi

if runs 3; then
    started 3 train
    train --config exps/voxceleb/conf/ecapa_tdnn.yaml "${data_flags[@]}" --eval_list "${trials[0]}" \
        "${train_flags[@]}" --save_path "$exp/ecapa"
    finished 3 train
fi

if runs 4; then
    started 4 finetune
    initial=$(last_checkpoint "$exp/ecapa")
    [ -n "$initial" ] || { echo "stage 4 needs a checkpoint of stage 3 in $exp/ecapa/model" >&2; exit 1; }
    train --config exps/voxceleb/conf/ecapa_tdnn_lm.yaml "${data_flags[@]}" --eval_list "${trials[0]}" \
        "${finetune_flags[@]}" --initial_model "$initial" --save_path "$exp/ecapa_lm"
    finished 4 finetune
fi

if runs 5; then
    started 5 eval
    final=$(last_checkpoint "$exp/ecapa_lm")
    final=${final:-$(last_checkpoint "$exp/ecapa")}
    [ -n "$final" ] || { echo "stage 5 needs a checkpoint of stage 3 or 4" >&2; exit 1; }
    mkdir -p "$exp/eval"
    "$PYTHON" trainECAPAModel.py --eval --config exps/voxceleb/conf/eval.yaml --initial_model "$final" \
        --eval_list "${trials[@]}" --eval_path "$voxceleb1_wav" --train_list "$train_list" --train_path "$voxceleb2_wav" \
        "${eval_flags[@]}" --save_path "$exp/eval" | tee "$exp/eval/results.txt"
    finished 5 eval
fi
