"""Stage 1a: the base model's own greedy answers to the benign SFT prompts (self-distillation targets), as tokens.

    python examples/cpu_study/distill.py --prompts DATA/sft_benign_prompts.jsonl --out OUT/answers.jsonl

Each row keeps the exact prompt token ids the model saw (chat template, default system prompt) and the token ids it
produced: up to and including its end-of-turn token, or its first ``--max-new-tokens`` tokens when it had not ended
by then (SmolLM2 often runs on past 192 tokens). ``sft.py`` trains on exactly these ids, so an answer that was cut
teaches its own beginning and no end-of-turn: the SFT neither shortens nor lengthens the model's answers.
Counts go to OUT's sibling ``distill.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sirl.eval.datasets import PromptSet
from sirl.eval.generate import generate, load_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    start = time.time()
    prompts = PromptSet(args.prompts)
    model, tokenizer = load_model(args.model, device="cpu", dtype=args.dtype)
    gens = generate(model, tokenizer, prompts.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    score_temperature=None, progress=True)
    rows = [{"prompt": g.prompt, "completion": g.response, "prompt_ids": g.prompt_ids, "completion_ids": g.response_ids,
             "ended": not g.truncated, "kind": row.get("kind")}
            for g, row in zip(gens, prompts.rows) if g.response.strip()]
    out = Path(args.out)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    info = {"model": args.model, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "prompts": len(gens),
            "kept": len(rows), "ended": sum(r["ended"] for r in rows), "dropped_empty": len(gens) - len(rows),
            "answer_tokens_mean": sum(len(r["completion_ids"]) for r in rows) / max(1, len(rows)),
            "elapsed_s": round(time.time() - start, 1)}
    (out.parent / "distill.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
