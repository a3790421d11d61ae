"""Evaluation of a (SIRL-trained) model: defense success rate under jailbreaks, over-refusal, capability spot checks,
the entropy gap between refusals and compliant answers, and before/after comparisons.

Modules (each small; the pure parts take lists and return dicts):

- ``judge``       refusal judges: keyword phrase matching (GCG / JailbreakBench / XSTest conventions), an LLM judge
                  on any local HF model, or your own function
- ``attacks``     offline jailbreak transformations (templates, base64, ciphers, prefix injection, ...)
- ``datasets``    prompt files (plain lists, JailbreakBench-expanded layouts, XSTest, MT-Bench, Alpaca) -> rows
- ``generate``    model loading (+ LoRA adapter), batched generation, per-response entropy via the fused kernels
- ``dsr``, ``overrefusal``, ``capability``, ``entropy_gap``, ``compare``: one command each
- ``suite``       the held-out sets ``sirl train`` evaluates every ``eval_every`` steps, with those commands
- ``report``      tables, summary.json and plots shared by the commands
- ``cli``         ``sirl eval ...`` and ``sirl analyze ...``
"""
