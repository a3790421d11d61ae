"""SIRL on engines people already run. Nothing heavy is imported here: each integration imports its engine lazily.

- ``sirl.integrations.trl``: ``SIRLGRPOTrainer``, a TRL ``GRPOTrainer`` whose log-prob passes run on
  ``sirl_kernels`` and whose no-grad policy pass turns into the SIRL reward (``pip install 'sirl-kernels[trl]'``).
- ``sirl.integrations.verl``: ``SIRLRewardManager`` (reward at the last response token, registered as ``"sirl"``)
  and ``forward_with_sirl_kernels``, a fused log-prob/entropy forward for verl's actor (needs verl installed).
- Any other loop: ``sirl_kernels.hf.sirl_reward(model, input_ids, attention_mask, completion_mask)``.

See docs/integrations.md.
"""
