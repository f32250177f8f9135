"""Where text comes from: clients of served models and the batch rewriters that replace completions.

- `api.py`: black-box teachers behind OpenAI-compatible endpoints (text: rationales, transfer sets); `seq_kd.py`:
  their completions as sequence-level KD training rows (truncated ones warned about or dropped).
- `onpolicy.py`: on-policy student samples and sequence-level KD targets, batch rewriters that run before the
  forward pass; `completion_log.py`: `log_completions` (`output_dir/completions.jsonl`).
- `vllm.py`: the vLLM server client (prompt log-probs, completions, runtime LoRA, in-place weight reloads);
  `vllm_sampler.py`: on-policy samples from a vLLM server kept in step with the student (`use_vllm`);
  `served.py`: served teachers' top-k log-probs.
"""
