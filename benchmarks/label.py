"""Labelling cost of a 16-principle ensemble vs a single principle, on hf (and vllm if installed).

    HF_HUB_OFFLINE=1 python benchmarks/label.py [--labels 8 --response-tokens 96]
    HF_HUB_OFFLINE=1 python benchmarks/label.py --judge likelihood   # time and tokens at 1, 4, 16

With `--judge likelihood` (or `both`) it prints, for the likelihood judge in both layouts, the
time and the tokens computed at 1, 4 and 16 principles, beside the floor: the tokens of every
distinct prefix of the scored sequences (a trie over them), i.e. each shared part computed
once. Target: within 1.1x of the floor at 16 principles for the chosen layout (system).

The same labels (prompt + two fixed responses each) are judged by `cai.judge.judge`, both
orders, under 1 principle and under 16 principles of the shipped harmless constitution. The
principle is the last part of the comparison prompt, so the 16 prompts of one (label, order)
share their whole prefix, which the hf engine computes once and vLLM's prefix cache reuses.
Target: 16 principles cost <= 2.5x one principle. The token ratio beside it is what the engine
computed for 16 over 1 (cached prefix tokens excluded): the floor for an engine that reuses
the shared prefix. The 1- and 16-principle runs alternate, --repeats rounds, each keeping its
fastest (vLLM's prefix cache is reset before each); single runs here vary by +-20%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import have_vllm  # noqa: E402


def labels(count: int, tokens: int):
    """Red-team prompts with two long, different responses each (realistic prompt lengths)."""
    import json

    from cai.resources import data_path

    rows = [json.loads(line) for line in data_path("red_team.jsonl").read_text().splitlines()][:count]
    words = (
        "I understand why you ask, but here is a careful answer that weighs the risks, the law and "
        "the people involved, and suggests a safer way to reach the same goal. "
    ).split()
    safe = " ".join((words * 10)[: int(tokens * 0.75)])
    unsafe = " ".join(
        (["Sure,", "here", "is", "exactly", "how", "to", "do", "it", "step", "by", "step."] * 20)[
            : int(tokens * 0.75)
        ]
    )
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    return conversations, [[safe, unsafe] for _ in rows]


def measure(backend, conversations, responses, n_principles: int, repeats: int = 2) -> tuple[float, int]:
    """(best wall time, tokens the engine computed in the last run: what an engine cannot avoid)."""
    from cai.chats import ChatBuilder
    from cai.constitution import load_constitution
    from cai.judge import LabelConfig, judge
    from cai.prompts import Templates

    constitution = load_constitution("harmless")
    builder = ChatBuilder(Templates(), constitution)
    chosen = constitution.select(stages=["compare"])[:n_principles]
    best, computed = float("inf"), 0
    # vLLM keeps its prefix cache across calls; a real run meets each label once
    reset = getattr(getattr(backend, "llm", None), "reset_prefix_cache", lambda: None)
    for _ in range(repeats):
        reset()
        before = backend.usage.scored_tokens
        started = time.perf_counter()
        judge(backend, builder, conversations, responses, [chosen] * len(conversations), LabelConfig())
        best = min(best, time.perf_counter() - started)
        computed = backend.usage.scored_tokens - before
    return best, computed


def trie_floor(token_lists) -> int:
    """Tokens an engine must compute when every shared prefix is computed once: trie nodes."""
    root: dict = {}
    nodes = 0
    for tokens in token_lists:
        node = root
        for token in tokens:
            if token not in node:
                node[token] = {}
                nodes += 1
            node = node[token]
    return nodes


def likelihood_rows(backend, conversations, responses, counts=(1, 4, 16)) -> None:
    """Time, computed tokens and the floor of the likelihood judge at 1, 4 and 16 principles."""
    from cai.chats import ChatBuilder
    from cai.constitution import load_constitution
    from cai.judge import LabelConfig, judge
    from cai.likelihood import conditioned_chat, conditioning
    from cai.prompts import Templates

    constitution = load_constitution("harmless")
    templates = Templates()
    builder = ChatBuilder(templates, constitution)
    print(f"{'layout':8}{'principles':>11}{'s':>8}{'computed':>10}{'floor':>9}{'ratio':>7}")
    for layout in ("system", "after"):
        config = LabelConfig(judge="likelihood", likelihood={"layout": layout})
        for count in counts:
            chosen = constitution.select(stages=["compare"])[:count]
            sequences = []
            for conversation, candidates in zip(conversations, responses, strict=True):
                for principle in chosen:
                    for text in conditioning(principle, templates):
                        prompt = backend.encode_chat(conditioned_chat(conversation, text, layout), "")
                        for response in candidates:
                            tail = backend.tokenizer(response, add_special_tokens=False)["input_ids"]
                            sequences.append(prompt + tail)
            floor = trie_floor(sequences)
            before = backend.usage.scored_tokens
            started = time.perf_counter()
            judge(backend, builder, conversations, responses, [chosen] * len(conversations), config)
            seconds = time.perf_counter() - started
            computed = backend.usage.scored_tokens - before
            print(f"{layout:8}{count:>11}{seconds:>8.2f}{computed:>10}{floor:>9}{computed / floor:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (1, 16); each keeps its best")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--judge", choices=["choice", "likelihood", "both"], default="both")
    args = parser.parse_args()

    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine, VLLMEngine

    conversations, responses = labels(args.labels, args.response_tokens)
    if args.judge in ("likelihood", "both"):
        print(f"\nlikelihood judge (hf): {args.labels} labels x 2 responses, ~{args.response_tokens} tokens")
        backend = HFBackend(args.model, HFEngine())
        likelihood_rows(backend, conversations[:1], responses[:1], counts=(1,))  # load + warm up
        likelihood_rows(backend, conversations, responses)
        backend.close()
        if args.judge == "likelihood":
            return
    engines = [("hf", lambda: HFBackend(args.model, HFEngine()))]
    engines.append(("hf, no prefix reuse", lambda: HFBackend(args.model, HFEngine(prefix_reuse=False))))
    if have_vllm() and not args.skip_vllm:
        from cai.backends.vllm import VLLMBackend

        engines.append(("vllm", lambda: VLLMBackend(args.model, VLLMEngine(enforce_eager=True))))
    else:
        print("vllm: not installed here (make setup-engines), skipped")
    print(f"\n{args.labels} labels x 2 orders, responses ~{args.response_tokens} tokens")
    print(
        f"{'engine':22}{'1 principle s':>15}{'16 principles s':>17}{'ratio':>8}{'token ratio':>14}"
        f"{'labels/s (16)':>15}"
    )
    for name, make in engines:
        backend = make()
        measure(backend, conversations[:1], responses[:1], 1, repeats=1)  # load + warm up
        # 1 and 16 alternate, each keeping its fastest run, so background load hits both alike;
        # the no-reuse reference is slow and only indicative: one round
        one = sixteen = float("inf")
        for _ in range(1 if "no prefix" in name else args.repeats):
            seconds, one_tokens = measure(backend, conversations, responses, 1, repeats=1)
            one = min(one, seconds)
            seconds, sixteen_tokens = measure(backend, conversations, responses, 16, repeats=1)
            sixteen = min(sixteen, seconds)
        ratio = sixteen / one
        floor = f"{sixteen_tokens / one_tokens:.2f}" if one_tokens else "n/a"
        verdict = (
            "(reference)"
            if "no prefix" in name
            else ("target <= 2.5: " + ("met" if ratio <= 2.5 else "MISSED"))
        )
        print(
            f"{name:22}{one:>15.2f}{sixteen:>17.2f}{ratio:>8.2f}{floor:>14}{args.labels / sixteen:>15.2f}"
            f"   {verdict}"
        )
        backend.close()
        del backend


if __name__ == "__main__":
    main()
