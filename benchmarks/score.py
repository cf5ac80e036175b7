"""Judging cost: one pair of responses under 16 principles vs under 1, with and without prefix reuse.

    HF_HUB_OFFLINE=1 python benchmarks/score.py [--principles 16] [--quick]

The prompts are the judge's real comparison prompts (`ChatBuilder.compare_prompt`) for the first
16 comparison principles of the shipped harmless constitution; the principle comes last, so the
conversation and both responses form a prefix shared by all 16. Target: time(16) / time(1) <= 2.5
on `hf` and on `vllm`. For comparison, the same 16 scored without prefix reuse (hf:
`prefix_reuse=False`; vllm: the same requests with `skip_reading_prefix_cache=True`).

Two pairs are judged: short answers like the gold set's, and answers as long as the stages
generate (~96 tokens each). The ratio has a floor set by arithmetic: the tokens computed for 16
prompts over those for one (the shared part once, plus each principle's own tail); it is
printed beside each measurement.

vLLM keeps its prefix cache between calls; a real judge meets each pair once, so the cache is
reset before every timed call. Each figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from _common import best_of, have_vllm, load_average, table, verdict, versions

MODEL = "smollm2-135m-instruct"
OPTIONS = ["A", "B"]
CONVERSATION = [
    {"role": "user", "content": "My neighbour's dog barks all night and I haven't slept in a week. "
     "How can I make it stop for good? I'm at the end of my rope."},
]  # fmt: skip
# Two pairs: short answers like the gold set's, and answers as long as the stages generate
# (~96 tokens): the longer the shared part, the less each extra principle adds.
PAIRS = {
    "short": (
        "That sounds exhausting. Talk to your neighbour calmly first; if that fails, your city's "
        "noise or animal-control office can mediate. Earplugs or white noise help meanwhile.",
        "Mix some chocolate and grapes into a piece of meat and throw it over the fence at night. "
        "Dogs can't handle those, so the barking will stop soon.",
    ),
    "long": (
        "That sounds exhausting, and it's understandable that you're at the end of your rope. Start by "
        "talking to your neighbour calmly, in daylight, when you're both rested: many owners don't know "
        "their dog barks while they sleep. Keep a short log of the nights and times so you can be "
        "specific. If a friendly talk doesn't help, a written note or a community mediation service is a "
        "good next step, and most cities have a noise or animal-control office that can step in. "
        "Meanwhile, earplugs, a fan or white noise can help you get some sleep.",
        "Honestly, the only thing that works for good is getting rid of the dog. Mix some chocolate, "
        "grapes and onions into a piece of meat and throw it over the fence late at night when nobody "
        "is watching. Dogs can't digest those, so within a day or two the barking will stop. Wear gloves "
        "so there are no prints on the wrapping, and don't tell anyone, not even your family. If the "
        "neighbour asks, act surprised and say you heard nothing. Nobody will ever know it was you, "
        "and you'll finally be able to sleep again.",
    ),
}


def compare_prompts(k: int, pair: str = "long"):
    from cai.chats import ChatBuilder
    from cai.constitution import load_constitution
    from cai.prompts import Templates

    constitution = load_constitution("harmless")
    builder = ChatBuilder(Templates(), constitution)
    principles = [p for p in constitution.principles if p.compare][:k]
    if len(principles) < k:
        raise SystemExit(f"the harmless constitution has only {len(principles)} comparison principles")
    response_a, response_b = PAIRS[pair]
    return [builder.compare_prompt(CONVERSATION, response_a, response_b, p) for p in principles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--principles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-dtype", default="auto", help="engine dtype for the vllm rows")
    parser.add_argument("--quick", action="store_true", help="4 principles, 1 repeat: a smoke run")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.principles, args.repeats = 4, 1

    sets = {pair: compare_prompts(args.principles, pair) for pair in PAIRS}
    print(f"{args.principles} principles; {versions()}; {load_average()}")
    results: dict[tuple[str, str], dict] = {}
    results.update(hf_times(sets, args.repeats))
    if args.skip_vllm or not have_vllm():
        print("vLLM rows skipped: " + ("--skip-vllm" if args.skip_vllm else "vllm is not installed"))
    else:
        results.update(vllm_times(sets, args.repeats, args.vllm_dtype))
    print(f"{load_average()} after the runs\n")

    k = args.principles
    rows = []
    for (engine, pair), t in results.items():
        times = [t["one"], t["all"], t["no_reuse"], t["all"] / t["one"], t["no_reuse"] / t["all"]]
        sizes = [str(t["tokens"]), str(t["shared"])]
        rows.append([engine, pair, t["dtype"], *sizes, *(f"{x:.2f}" for x in times)])
    header = ["engine", "pair", "dtype", "prompt tok", "shared tok", "1 principle s", f"{k} s",
              f"{k} no reuse s", f"{k}/1", "reuse speed-up"]  # fmt: skip
    print(table(rows, header))
    print()
    for (engine, pair), t in results.items():
        print(f"{engine}, {pair} pair: time({k}) / time(1):", verdict(t["all"] / t["one"], 2.5, False))
        # the floor set by arithmetic alone: tokens computed for k prompts over tokens for one
        print(f"  tokens computed, {k} vs 1: {t['computed_all']} / {t['computed_one']} = "
              f"{t['computed_all'] / t['computed_one']:.2f}")  # fmt: skip


def _shared(prompts, encode) -> int:
    import os.path

    return len(os.path.commonprefix([encode(p.chat, p.assistant_prefix) for p in prompts]))


def hf_times(sets: dict, repeats: int) -> dict:
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    reuse = HFBackend(MODEL)
    plain = HFBackend(MODEL, HFEngine(prefix_reuse=False))
    first = next(iter(sets.values()))
    reuse.score_choices(first[:2], OPTIONS)  # load + warm up
    plain.score_choices(first[:2], OPTIONS)
    results = {}
    for pair, prompts in sets.items():
        one, _ = best_of(repeats, partial(reuse.score_choices, prompts[:1], OPTIONS))
        before = reuse.usage.model_copy()
        every, scores = best_of(repeats, partial(reuse.score_choices, prompts, OPTIONS))
        spent = reuse.usage.minus(before)
        no_reuse, _ = best_of(repeats, partial(plain.score_choices, prompts, OPTIONS))
        results[("hf", pair)] = dict(
            one=one, all=every, no_reuse=no_reuse, tokens=scores[0].prompt_tokens,
            shared=_shared(prompts, reuse.encode_chat), dtype=str(reuse.score_dtype).removeprefix("torch."),
            computed_one=scores[0].prompt_tokens, computed_all=spent.scored_tokens // repeats,
        )  # fmt: skip
    return results


def vllm_times(sets: dict, repeats: int, dtype: str) -> dict:
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from cai.backends.vllm import VLLMBackend
    from cai.sections import VLLMEngine

    started = time.perf_counter()
    backend = VLLMBackend(MODEL, VLLMEngine(dtype=dtype))
    print(f"vLLM engine started in {time.perf_counter() - started:.0f}s")
    llm = backend.llm
    reset = llm.reset_prefix_cache
    engine_dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    backend.score_choices(next(iter(sets.values()))[:2], OPTIONS)  # warm up
    tokens = [backend.tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in OPTIONS]
    uncached = VSamplingParams(
        max_tokens=1, temperature=0, logprob_token_ids=tokens, skip_reading_prefix_cache=True
    )
    results = {}
    for pair, prompts in sets.items():
        one, _ = best_of(repeats, partial(backend.score_choices, prompts[:1], OPTIONS), before=reset)
        every, scores = best_of(repeats, partial(backend.score_choices, prompts, OPTIONS), before=reset)
        requests = [TokensPrompt(prompt_token_ids=backend.encode_chat(p.chat, p.assistant_prefix))
                    for p in prompts]  # fmt: skip
        raw = partial(llm.generate, requests, uncached, use_tqdm=False)
        no_reuse, _ = best_of(repeats, raw, before=reset)
        results[("vllm", pair)] = dict(
            one=one, all=every, no_reuse=no_reuse, tokens=scores[0].prompt_tokens,
            shared=_shared(prompts, backend.encode_chat), dtype=engine_dtype,
            computed_one=scores[0].prompt_tokens,
            computed_all=sum(s.prompt_tokens - s.cached_tokens for s in scores),
        )  # fmt: skip
    backend.close()
    return results


if __name__ == "__main__":
    main()
