"""Where text comes from: clients of served models and the batch rewriters that replace completions.

- `api.py`: black-box teachers behind OpenAI-compatible endpoints (text: rationales, transfer sets, seq-KD targets).
- `onpolicy.py`: on-policy student samples and sequence-level KD targets, batch rewriters that run before the
  forward pass.
"""
