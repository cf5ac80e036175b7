"""Where the verdict margin (label.min_margin) comes from: the default judge in fp32 and bf16.

    HF_HUB_OFFLINE=1 python benchmarks/margin.py [--principles 4] [--limit 64]

The choice judge (SmolLM2-135M, the quickstart's) reads every gold pair under the quickstart's
principle selection, in both orders, once scoring in fp32 and once in bf16. For each
(principle, pair) reading it prints how far the two-order average sits from 0.5, how much the
precision alone moves it, and, for a range of margins, how many readings are verdicts and how
many change (verdict or not, or direction) between the two precisions. A margin worth having
is one above which precision no longer changes verdicts; the gate's figures for the same judge
close the output. Not a speed benchmark: it prints the dtype and CPU it ran with for the record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1)


def readings(dtype: str, principles: int, limit: int, gate: bool):
    """Per (gold pair, principle): P(A better) read in order ab and in order ba, and the gate check."""
    from cai.backends.hf import HFBackend
    from cai.chats import ChatBuilder
    from cai.constitution import load_constitution
    from cai.gate import load_gold, measure_judge
    from cai.judge import LabelConfig, choose_principles, judge
    from cai.models import DEFAULT_MODEL, resolve_model
    from cai.prompts import Templates
    from cai.sections import HFEngine

    constitution = load_constitution("harmless")
    builder = ChatBuilder(Templates(), constitution)
    gold = load_gold("gold_harmless.jsonl")[:limit]
    config = LabelConfig(principles={"count": principles}, min_margin=0.0)
    backend = HFBackend(resolve_model(DEFAULT_MODEL), HFEngine(score_dtype=dtype))
    started = time.perf_counter()
    votes = judge(
        backend,
        builder,
        [[{"role": "user", "content": g.prompt}] for g in gold],
        [[g.response_a, g.response_b] for g in gold],
        [choose_principles(constitution, config.principles, 0, g.id) for g in gold],
        config,
    )
    seconds = time.perf_counter() - started
    pairs = []
    for label_votes in votes:
        for vote in label_votes:
            by = {o.order: o for o in vote.orders}
            pairs.append((by["ab"].probs[0], by["ba"].probs[1]))  # P(i better) in each order
    check = None
    if gate:
        settings = LabelConfig(principles={"count": principles})
        check = measure_judge(backend, builder, constitution, gold, settings, 0, False, "gold")
    backend.close()
    return pairs, seconds, check


def verdict(p_ab: float, p_ba: float, margin: float) -> int:
    from cai.verdict import two_order_verdict

    return two_order_verdict(p_ab, p_ba, margin).side


def main() -> None:
    import statistics

    import torch

    from cai.hardware import cpu_has_fast_bf16

    parser = argparse.ArgumentParser()
    parser.add_argument("--principles", type=int, default=4)
    parser.add_argument("--limit", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}")
    fp32, t32, check = readings("float32", args.principles, args.limit, gate=True)
    bf16, t16, _ = readings("bfloat16", args.principles, args.limit, gate=False)
    print(f"{len(fp32)} readings (gold pairs x {args.principles} principles)", end="; ")
    print(f"fp32 {t32:.0f} s, bf16 {t16:.0f} s")
    for name, rows in (("fp32", fp32), ("bf16", bf16)):
        consistent = sum((a > 0.5) == (b > 0.5) and a != 0.5 and b != 0.5 for a, b in rows)
        distance = sorted(abs((a + b) / 2 - 0.5) for a, b in rows)
        quantiles = statistics.quantiles(distance, n=20)
        print(
            f"{name}: position consistent {consistent}/{len(rows)}; |mean of orders - 0.5|: "
            f"median {statistics.median(distance):.3f}, 95th pct {quantiles[-1]:.3f}, max {distance[-1]:.3f}"
        )
    shift = sorted(abs((a + b) / 2 - (c + d) / 2) for (a, b), (c, d) in zip(fp32, bf16, strict=True))
    per_order = sorted(abs(x - y) for r, s in zip(fp32, bf16, strict=True) for x, y in zip(r, s, strict=True))
    print(
        f"bf16 vs fp32, two-order average: mean shift {statistics.fmean(shift):.4f}, "
        f"95th pct {statistics.quantiles(shift, n=20)[-1]:.4f}, max {shift[-1]:.4f}; "
        f"single order: mean {statistics.fmean(per_order):.4f}, max {per_order[-1]:.4f}"
    )
    print(f"{'margin':>7} {'verdicts fp32':>14} {'verdicts bf16':>14} {'changed by precision':>21}")
    for margin in MARGINS:
        v32 = [verdict(a, b, margin) for a, b in fp32]
        v16 = [verdict(a, b, margin) for a, b in bf16]
        changed = sum(x != y for x, y in zip(v32, v16, strict=True))
        print(f"{margin:>7.2f} {sum(v != 0 for v in v32):>14} {sum(v != 0 for v in v16):>14} {changed:>21}")
    print(
        f"gate (fp32, margin 0.05): agreement {check.agreement:.2f} [{check.ci[0]:.2f}, {check.ci[1]:.2f}], "
        f"coverage {check.coverage:.2f}, position consistency {check.position_consistency:.0%}, "
        + ", ".join(f"{k} {v.agreement:.2f}" for k, v in check.by_category.items())
    )


if __name__ == "__main__":
    main()
