#!/usr/bin/env bash
# One GPU-machine session for the default model (see ASSETS: the GGUF travels in two parts, .stage/a then
# .stage/b; the first call copies part a to /root/stage). Joins and checks the model, installs the gguf wheel
# from .whl, times calibration per layer, then quantizes and evaluates. Everything lands in $OUT.
set -uo pipefail
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/stage/gguf.part.aa .stage/b/gguf.part.ab > $GGUF
echo "$SHA  $GGUF" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export FLATQUANT_DATA=$PWD/.stage/data PYTHONUNBUFFERED=1
timeout ${TIME_BUDGET:-200} python3 scripts/time_calibration.py --gguf $GGUF --steps 16 --out $OUT/calib_timing.json 2>&1 | grep -v -E "it/s|s/it" | tee $OUT/timing.log
timeout ${BASE_BUDGET:-120} python3 scripts/gpu_eval.py --gguf $GGUF --methods rtn,quarot --wquant rtn,gptq --out $OUT/gpu_eval_baselines.json 2>&1 | grep -v -E "it/s|s/it" | tee $OUT/baselines.log
timeout ${FQ_BUDGET:-330} python3 scripts/gpu_eval.py --gguf $GGUF --methods flatquant --epochs ${FQ_EPOCHS:-2} --out $OUT/gpu_eval_flatquant.json 2>&1 | grep -v -E "it/s|s/it" | tee $OUT/flatquant.log
