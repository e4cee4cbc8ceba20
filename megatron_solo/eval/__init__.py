"""Evaluation: pure metrics (metrics.py), task files -> prompts -> scores (tasks.py), JSONL records (records.py),
the lmms-eval model adapter (lmms_eval_solo.py). The CLI is ``python -m megatron_solo.evaluate``."""
