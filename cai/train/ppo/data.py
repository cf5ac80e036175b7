"""PPO's data: the prompts rolled out, the plain texts of the ptx term, and who gets which when.

Every choice is a seeded permutation per pass over the data, keyed by (config seed, purpose,
pass), and a step's share is cut by process index: so a resumed run, or any rank of a DDP run,
takes exactly the prompts and texts an uninterrupted single run would have given it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cai.backends.base import Chat
from cai.hashing import derive_seed
from cai.train.ppo.config import PPOConfig


def load_prompts(sources: Sequence[str]) -> list[Chat]:
    """Prompts from shipped data names or paths, read by `cai.sources` like every stage's."""
    from cai.sources import PromptSource
    from cai.sources import load_prompts as read

    chats = [item.prompt for source in sources for item in read(PromptSource(path=source))]
    if not chats:
        raise ValueError(f"no prompts found in {list(sources)}")
    return chats


def load_texts(source: str) -> list[str | Chat]:
    """Plain texts or demonstration chats for the PPO-ptx term (see PTXSection.source).

    A .txt file holds texts separated by blank lines; other sources are rows with `text`,
    `messages` (a chat), `chosen` or `prompt` + `response`.
    """
    from cai.sources import read_records, resolve

    path = Path(source).expanduser()
    if path.suffix == ".txt" and path.exists():
        return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    texts: list[str | Chat] = []
    for row in read_records(resolve(source), "train"):
        if "text" in row:
            texts.append(row["text"])
        elif "messages" in row:
            texts.append(row["messages"])
        elif "chosen" in row:
            chosen = row["chosen"]
            texts.append(chosen if isinstance(chosen, str) else list(row.get("prompt", [])) + list(chosen))
        elif "prompt" in row and ("response" in row or "completion" in row):
            answer = row.get("response", row.get("completion"))
            texts.append(
                [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]
            )
        else:
            raise ValueError(f"ptx source {source}: a row has none of text/messages/chosen/prompt+response")
    return texts


def tokenize_texts(
    texts: Sequence[str | Chat], tokenizer: Any, eos_id: int, max_length: int
) -> list[list[int]]:
    """Token ids of ptx texts: a plain text ends with EOS, a chat is rendered by its template."""
    ids = []
    for text in texts:
        if isinstance(text, str):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
        else:
            rendered = tokenizer.apply_chat_template(text, tokenize=False)
            tokens = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if len(tokens) >= 2:
            ids.append(tokens[:max_length])
    return ids


class PPOData:
    """Which prompts a step rolls out and which ptx texts an update trains on, per process."""

    def __init__(
        self,
        config: PPOConfig,
        prompts: list[Chat],
        ptx_ids: list[list[int]],
        pad_id: int,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        self.config = config
        self.prompts = prompts
        self.ptx_ids = ptx_ids
        self.pad_id = pad_id
        self.num_processes = num_processes
        self.process_index = process_index

    @property
    def prompts_per_step(self) -> int:
        """Prompts consumed per step by all processes together (the data position unit)."""
        return self.config.rollout_batch_size * self.num_processes

    def _pick(self, items: list, purpose: str, start: int, count: int) -> list:
        """Items start..start+count of a stream of seeded permutations, one per pass."""
        n = len(items)
        picked = []
        for i in range(start, start + count):
            epoch, offset = divmod(i, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(derive_seed(self.config.seed, purpose, epoch))
            )
            picked.append(items[int(order[offset])])
        return picked

    def prompts_for(self, step: int) -> list[Chat]:
        """This process's prompts of `step`."""
        size = self.config.rollout_batch_size
        return self._pick(
            self.prompts, "data", step * self.prompts_per_step + self.process_index * size, size
        )

    def ptx_batch(self, update: int, device: Any = None) -> dict[str, torch.Tensor]:
        """The `update`-th ptx batch of this process, right-padded: input_ids, attention_mask (N, L)."""
        assert self.config.ptx is not None
        size = self.config.ptx.batch_size
        rows = self._pick(
            self.ptx_ids, "ptx", (update * self.num_processes + self.process_index) * size, size
        )
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        return {"input_ids": ids, "attention_mask": mask}  # (N, L) each
