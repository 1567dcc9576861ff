# Sourced by the scripts: offline, quiet defaults for bt-ray (no model hub, no usage stats).
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export LITELLM_LOCAL_MODEL_COST_MAP=True
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
