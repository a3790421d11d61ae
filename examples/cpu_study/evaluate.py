"""The study's test evaluation of one model: held-out jailbreaks, over-refusal and capability, greedy.

    python examples/cpu_study/evaluate.py --model M [--adapter A] --data-dir DATA --shared-data ../shared/data --out OUT

Runs the ``sirl eval`` functions (``run_dsr``, ``run_overrefusal``, ``run_capability``) on the test sets that
``data.py`` wrote, with the same settings for every model, each part into its own folder of ``OUT``:

==========================  ======================================================================================
``dsr_jbb_direct``          all 100 JailbreakBench goals, asked directly
``dsr_jbb_columns``         10 JailbreakBench behaviours (one per category) x the 23 pre-generated attack columns
``dsr_hm_columns``          10 HarmBench behaviours x the 8 pre-generated attack columns of ``hm_expanded.csv``
``dsr_offline``             the same 10 JailbreakBench behaviours x the held-out offline attacks (past_tense, base64,
                            rot13, caesar, atbash, GPTFuzzer templates)
``overrefusal``             100 XSTest safe prompts (10 per type)
``capability_mtbench``      40 MT-Bench first turns: length, repetition, perplexity under the *original* SmolLM2
``capability_capitals``     the 40-question capitals task (``capitals.py``), scored by exact answer
==========================  ======================================================================================

DSR and over-refusal answers skip the per-token entropy pass (``score_temperature=None``: it would double the
cost of the long attack prompts, and the entropy gap has its own stage); the judge is the keyword judge for all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EVAL_PARTS = ("dsr_jbb_direct", "dsr_jbb_columns", "dsr_hm_columns", "dsr_offline", "overrefusal",
              "capability_mtbench", "capability_capitals")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--base-model", default="smollm2-135m-instruct", help="perplexity reference")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--shared-data", default="../shared/data")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--capability-max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=list(EVAL_PARTS), choices=EVAL_PARTS)
    args = p.parse_args(argv)

    import torch

    from capitals import score as capitals_score
    from data import EVAL_OFFLINE_ATTACKS
    from sirl.eval.attacks import load_templates, resolve_attacks
    from sirl.eval.capability import run_capability
    from sirl.eval.datasets import PromptSet
    from sirl.eval.dsr import run_dsr
    from sirl.eval.generate import load_model
    from sirl.eval.judge import load_judge
    from sirl.eval.overrefusal import DEFAULT_FILTERS, run_overrefusal

    data, shared, out = Path(args.data_dir), Path(args.shared_data), Path(args.out)
    judge = load_judge("keyword")
    model, tokenizer = load_model(args.model, args.adapter, device="cpu", dtype=args.dtype, seed=args.seed)
    base = load_model(args.base_model, device="cpu", dtype=args.dtype) if "capability_mtbench" in args.parts else None
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=False, temperature=1.0,
               top_p=1.0, samples_per_prompt=1, system_prompt=None, max_prompt_tokens=2048, progress=False,
               score_temperature=None)
    meta = dict(model=args.model, adapter=args.adapter, seed=args.seed, dtype=args.dtype)
    timings = {}

    def dsr(name, source, attacks, templates=None):
        prompts = PromptSet(source)
        resolved = resolve_attacks(attacks, templates=templates, columns=prompts.attack_columns)
        return run_dsr(model, tokenizer, prompts, resolved, judge, output_dir=out / name, gen=gen, meta=meta,
                       plot=False, echo=False)

    parts = {
        "dsr_jbb_direct": lambda: dsr("dsr_jbb_direct", str(shared / "jbb" / "harmful-behaviors.csv"), ["direct"]),
        "dsr_jbb_columns": lambda: dsr("dsr_jbb_columns", str(data / "jbb_test_columns.csv"), ["columns"]),
        "dsr_hm_columns": lambda: dsr("dsr_hm_columns", str(data / "hm_test_columns.csv"), ["columns"]),
        "dsr_offline": lambda: dsr("dsr_offline", str(data / "jbb_test_offline.jsonl"), list(EVAL_OFFLINE_ATTACKS),
                                   templates=load_templates(shared / "gptfuzz" / "GPTFuzzer.csv")),
        "overrefusal": lambda: run_overrefusal(
            model, tokenizer, PromptSet(str(data / "xstest_test.csv"), default_filters=DEFAULT_FILTERS), judge,
            output_dir=out / "overrefusal", gen=gen, meta=meta, plot=False, echo=False),
        "capability_mtbench": lambda: run_capability(
            model, tokenizer, PromptSet(str(data / "mtbench_probe.jsonl")), output_dir=out / "capability_mtbench",
            gen={**gen, "max_new_tokens": args.capability_max_new_tokens}, base=base, judge=judge,
            meta={**meta, "base_model": args.base_model}, plot=False, echo=False),
        "capability_capitals": lambda: run_capability(
            model, tokenizer, PromptSet(str(data / "capitals.jsonl")), output_dir=out / "capability_capitals",
            gen=gen, base=base, score_fn=capitals_score, judge=judge, meta={**meta, "base_model": args.base_model},
            plot=False, echo=False),
    }
    summary = {}
    for name in args.parts:
        t = time.time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            s = parts[name]()
        timings[name] = round(time.time() - t, 1)
        summary[name] = {k: s.get(k) for k in ("dsr", "n", "refusal_rate", "perplexity", "judge_score_mean",
                                              "response_tokens_mean", "repetition") if k in s}
        print(f"{name}: {summary[name]} ({timings[name]} s)", flush=True)
    (out / "eval.json").write_text(json.dumps({"summary": summary, "elapsed_s": timings, **meta}, indent=2) + "\n")


if __name__ == "__main__":
    main()
