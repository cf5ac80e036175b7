"""Scoring many continuations that share prefixes at several depths: each shared token once.

The likelihood judge scores every response of a label under every principle twice (a system
text describing an assistant that follows the principle, one that violates it). Its sequences
form a tree: the chat template's start, then a conditioning text shared by every label, then a
label's conversation shared by its K responses, then the responses. Computing each sequence
alone repeats the shared parts; grouping on one exact prompt repeats the conditioning text for
every label. Here the sequences of a call are sorted; runs sharing a long prefix compute it once
into a KV cache, and the rest of each run is packed as a trie: every distinct (prefix of a)
sequence is one position, attending to its ancestors only (a tree attention mask) at the
position id of its depth. So the tokens computed are the trie's nodes: the floor, bar the tokens
a pack boundary splits (a pack is bounded, because its attention is dense).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a cache pass
TREE_TOKENS = 1024  # most trie nodes in one packed row (attention over a pack is dense)


@dataclass
class Sequence_:
    """One continuation to score: its prompt + continuation ids and how many end in the continuation."""

    item: int
    tokens: list[int]
    continuation: int  # >= 1


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def clusters(sequences: list[Sequence_]) -> list[tuple[int, list[Sequence_]]]:
    """(shared prefix length, members) runs of the sorted sequences; a loner's prefix is 0.

    The prefix stops before each member's last prompt token, whose logits predict the first
    continuation token and so must be computed in the pack.
    """
    out: list[tuple[int, list[Sequence_]]] = []
    run: list[Sequence_] = []
    for seq in sorted(sequences, key=lambda s: s.tokens):
        if run and _common(run[0].tokens, seq.tokens) >= MIN_SHARED_PREFIX:
            run.append(seq)
            continue
        if run:
            out.append(run)  # type: ignore[arg-type]
        run = [seq]
    if run:
        out.append(run)  # type: ignore[arg-type]
    result = []
    for members in out:  # type: ignore[assignment]
        if len(members) == 1:
            result.append((0, members))
            continue
        shared = _common(members[0].tokens, members[-1].tokens)  # sorted: the minimum over the run
        room = min(len(s.tokens) - s.continuation - 1 for s in members)
        prefix = min(shared, room)
        result.append((prefix if prefix >= MIN_SHARED_PREFIX else 0, members))
    return result


def packs(prefix: int, members: list[Sequence_], budget: int | None = None) -> list[list[Sequence_]]:
    """Consecutive members whose new trie nodes stay within `budget` (default `TREE_TOKENS`; at
    least one member each)."""
    budget = TREE_TOKENS if budget is None else budget
    out: list[list[Sequence_]] = [[]]
    used = 0
    previous: list[int] | None = None
    for seq in members:
        body = seq.tokens[prefix:-1]  # the last token predicts nothing
        new = len(body) - (_common(previous, body) if previous is not None else 0)
        if out[-1] and used + new > budget:
            out.append([])
            used, new = 0, len(body)
        out[-1].append(seq)
        used += new
        previous = body
    return out


def trie(prefix: int, members: list[Sequence_]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """(node tokens, parent of each node (-1: the cached prefix), depth, each member's node path).

    A member's path holds the nodes of its tokens after the prefix, bar its last token.

    Nodes are numbered in creation order, so a parent always precedes its children.
    """
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    paths: list[list[int]] = []
    root: dict[int, tuple[int, dict]] = {}
    for seq in members:
        level, up, path = root, -1, []
        for token in seq.tokens[prefix:-1]:
            if token not in level:
                tokens.append(token)
                parent.append(up)
                depth.append(depth[up] + 1 if up >= 0 else 0)
                level[token] = (len(tokens) - 1, {})
            node, level = level[token]
            path.append(node)
            up = node
        paths.append(path)
    return tokens, parent, depth, paths


def score_pack(model, cache, prefix: int, members: list[Sequence_], device) -> tuple[list[float], list[int]]:
    """Summed continuation log-probs of `members` from one packed trie pass, and the nodes each
    member added (what was computed for it; its other tokens were shared)."""
    import torch

    tokens, parent, depth, paths = trie(prefix, members)
    n = len(tokens)
    seen: set[int] = set()
    added = []
    for path in paths:
        added.append(len(set(path) - seen))
        seen.update(path)
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    for node, up in enumerate(parent):
        if up >= 0:
            allowed[node] = allowed[up]
        allowed[node, node] = True
    dtype = next(model.parameters()).dtype
    mask = torch.full((n, prefix + n), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:, :prefix] = 0
    mask[:, prefix:].masked_fill_(allowed, 0)
    # positions whose logits predict a continuation token: the last prompt token onwards
    wanted: dict[int, int] = {}
    reads: list[list[tuple[int, int]]] = []
    for seq, path in zip(members, paths, strict=True):
        start = len(seq.tokens) - prefix - seq.continuation - 1  # index in path of the last prompt token
        targets = seq.tokens[-seq.continuation :]
        pairs = []
        for offset, target in enumerate(targets):
            node = path[start + offset]
            pairs.append((wanted.setdefault(node, len(wanted)), target))
        reads.append(pairs)
    keep = sorted(wanted, key=wanted.get)  # type: ignore[arg-type]
    logits = model(
        input_ids=torch.tensor([tokens], device=device),
        attention_mask=mask[None, None],
        position_ids=torch.tensor([[prefix + d for d in depth]], device=device),
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=torch.tensor(keep, device=device),
    ).logits.float()
    logp = torch.log_softmax(logits[0], dim=-1)
    values = []
    for pairs in reads:
        rows = torch.tensor([row for row, _ in pairs], device=device)
        cols = torch.tensor([target for _, target in pairs], device=device)
        values.append(float(logp[rows, cols].sum()))
    return values, added


def score_tree(model, sequences: list[Sequence_], device) -> dict[int, tuple[float, int, int]]:
    """By item: (summed continuation log-prob, tokens computed for it, tokens it shared).

    A sequence run alone computes all its tokens but the last (whose logits predict nothing), so
    "shared" counts the others it did not compute: 0 for a loner.
    """
    import torch

    out: dict[int, tuple[float, int, int]] = {}
    for prefix, members in clusters(sequences):
        cache = None
        if prefix:
            ids = torch.tensor([members[0].tokens[:prefix]], device=device)
            cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        for number, pack in enumerate(packs(prefix, members)):
            if cache is not None:
                extra = cache.get_seq_length() - prefix
                if extra:
                    cache.crop(-extra)  # drop the previous pack's nodes
            values, added = score_pack(model, cache, prefix, pack, device)
            for k, (seq, value, new) in enumerate(zip(pack, values, added, strict=True)):
                first = number == 0 and k == 0  # the cluster's first member pays for the prefix
                computed = new + (prefix if first else 0)
                out[seq.item] = (value, computed, len(seq.tokens) - 1 - computed)
    return out
