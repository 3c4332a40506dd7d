"""Self-speculative decoding on a real checkpoint: acceptance across draft sparsity and K.

For each prompt set (chat questions through the chat template; windows of an evaluation text),
sampling mode (greedy; temperature 0.8), draft sparsity and K, it decodes with
generate.speculative_generate (target dense) and reports the acceptance rate and the mean tokens
per verify step. Greedy runs are checked token for token against plain greedy decoding. Draft and
verify step times are reported but depend on the device (eager unless --compile).

    python benchmarks/bench_speculative.py --eval_text eval.txt --out docs/speculative/acceptance_cpu

Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import datetime
import itertools
import platform
import sys
from pathlib import Path

from cli import DEFAULT_CHECKPOINT, FRACTION, ArgumentParser, int_at_least, run_main

import torch

from checkpoint import load_model, resolve_checkpoint
from files import atomic_path, check_writable, write_json
from generate import Sampling, generate, speculative_generate, thresholds_path
from teal import densify, load_thresholds, sparsify
from teal.calibration import read_text
from teal.sparsify import TealState
from tokenizer import chat_template, load_tokenizer, render_chat

CHAT_PROMPTS = ["Explain in two sentences why the sky is blue.",
                "Write a short poem about the sea.",
                "What are three tips for learning a new language?"]


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="converted checkpoint folder")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="thresholds file (default: <checkpoint>/teal_thresholds.safetensors)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default="greedy", help="draft thresholds' allocation")
    p.add_argument("--eval_text", type=Path, required=True, help="text whose windows are the text prompts")
    p.add_argument("--draft_sparsity", type=FRACTION, nargs="+", default=[0.4, 0.5, 0.65, 0.8])
    p.add_argument("--k", type=int_at_least(1), nargs="+", default=[2, 4, 6], help="drafted tokens per cycle")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--prompts", type=int_at_least(1), default=2, help="prompts per set (chat and text)")
    p.add_argument("--prompt_tokens", type=int_at_least(1), default=128, help="tokens of each text prompt")
    p.add_argument("--new_tokens", type=int_at_least(1), default=64, help="tokens generated per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.json and OUT.md")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    check_writable(json_path)
    folder = resolve_checkpoint(args.checkpoint_path)[0]
    tok = load_tokenizer(folder)
    text_ids = tok.encode(read_text(args.eval_text))
    prompt_sets = {
        "chat": [tok.encode(render_chat(chat_template(folder), [{"role": "user", "content": q}]))
                 for q in CHAT_PROMPTS[: args.prompts]],
        "text": [text_ids[i * 4096: i * 4096 + args.prompt_tokens] for i in range(args.prompts)],
    }
    model = load_model(args.checkpoint_path, device=args.device, dtype=torch.float32)
    thresholds = thresholds_path(args)
    rows = []
    for draft_level in args.draft_sparsity:
        sparsify(model, load_thresholds(thresholds, model, draft_level, args.allocation))
        draft = TealState.of(model)
        densify(model)
        target = TealState.of(model)
        for (kind, prompts), temperature, k in itertools.product(prompt_sets.items(), args.temperatures, args.k):
            s = Sampling(temperature=temperature, top_k=200 if temperature > 0 else None)
            drafted = accepted = verifies = 0
            draft_s = verify_s = 0.0
            identical = True
            for i, prompt in enumerate(prompts):
                torch.manual_seed(i)
                res, st = speculative_generate(model, prompt, args.new_tokens, s, k, draft, target, tok.eos_ids)
                drafted, accepted, verifies = drafted + st.drafted, accepted + st.accepted, verifies + st.verifies
                draft_s, verify_s = draft_s + st.draft_s, verify_s + st.verify_s
                if temperature <= 0:
                    target.restore()
                    identical &= res.tokens == generate(model, prompt, args.new_tokens, s, eos_ids=tok.eos_ids).tokens
            row = {"prompts": kind, "temperature": temperature, "draft_sparsity": draft_level, "k": k,
                   "acceptance_rate": round(accepted / drafted, 4), "tokens_per_verify":
                   round((accepted + verifies) / verifies, 3), "draft_ms_per_token": round(1e3 * draft_s / drafted, 2),
                   "verify_ms": round(1e3 * verify_s / verifies, 2),
                   "greedy_identical": identical if temperature <= 0 else None}
            rows.append(row)
            print(row, flush=True)
    if any(r["greedy_identical"] is False for r in rows):
        print("WARNING: a greedy speculative run differed from plain greedy decoding", file=sys.stderr)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}", "device": args.device,
            "torch": torch.__version__, "allocation": args.allocation, "new_tokens": args.new_tokens}
    write_json(json_path, {**meta, "rows": rows})
    lines = [f"# Self-speculative decoding: acceptance on {folder.name} ({meta['date']})", "",
             f"`{meta['command']}`", "",
             f"Target dense, draft = the same model at the draft sparsity ({args.allocation} thresholds), "
             f"{args.prompts} prompts per set, {args.new_tokens} new tokens each, device {args.device} "
             f"(eager, float32: step times are indicative only).", "",
             "| prompts | temperature | draft sparsity | K | acceptance | tokens / verify | greedy = plain |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['prompts']} | {r['temperature']:g} | {r['draft_sparsity']:.2f} | {r['k']} | "
              f"{r['acceptance_rate']:.1%} | {r['tokens_per_verify']:.2f} | "
              f"{'-' if r['greedy_identical'] is None else ('yes' if r['greedy_identical'] else 'NO')} |" for r in rows]
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    run_main(main)
