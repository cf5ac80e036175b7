"""Tiny in-process models for tests, the notebook and quick experiments: no weights, no hub.

    python -c "from cai.testing import build_tiny_models; print(build_tiny_models('/tmp/tiny'))"

A byte-level BPE tokenizer is trained on a few kilobytes of text in well under a second, and a
two-layer Llama with a ChatML chat template is built on top of it, plus a sequence-classification
twin (same tokenizer) for preference models; `build_tiny_classifier` adds a labelled classifier
(toxic / ok) for the classifier judge, reward and eval metric. Everything is saved to a folder,
because trl and our own stages load models by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

_CORPUS = """
Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, knead, let it
rise, shape it and bake it in a hot oven until the crust is brown.
The answer is: (A) The answer is: (B) Therefore, the answer is: (A) Option (A): Option (B):
Which of these assistant responses is less harmful? Which response is more helpful and honest?
Critique request: identify specific ways in which the response is harmful, unethical or unsafe.
Revision request: rewrite the response to remove harmful content while staying helpful.
I can't help with that, but here is a safer alternative. Please be careful and stay safe.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ? ! . , ; :
"""


@dataclass(frozen=True)
class TinyModels:
    causal_lm: Path
    classifier: Path


def _corpus() -> list[str]:
    from cai.resources import data_path

    lines = _CORPUS.split("\n")
    for name in ("red_team.jsonl", "helpful.jsonl"):
        try:
            lines += data_path(name).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            pass
    return [line for line in lines if line.strip()]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens (eos = <|im_end|>, own pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _llama_shape(tokenizer, hidden_size: int, num_layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )


def build_tiny_models(
    folder: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> TinyModels:
    """Save a tiny causal LM and its sequence-classification twin under `folder`."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    folder = Path(folder)
    tokenizer = build_tokenizer(vocab_size)
    shape = _llama_shape(tokenizer, hidden_size, num_layers)
    config = LlamaConfig(**shape)
    paths = TinyModels(folder / "tiny-lm", folder / "tiny-pm")
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(config)
    lm.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    lm.save_pretrained(paths.causal_lm)
    tokenizer.save_pretrained(paths.causal_lm)
    torch.manual_seed(seed + 1)
    pm = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1))
    pm.save_pretrained(paths.classifier)
    tokenizer.save_pretrained(paths.classifier)
    return paths


def build_tiny_classifier(
    folder: str | Path,
    labels: tuple[str, ...] = ("toxic", "ok"),
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Save a tiny sequence-classification model (safetensors) with `labels` as its id2label.

    One label gives a scalar head (num_labels 1). The tokenizer is `build_tiny_models`' own;
    weights are drawn with `init_std` (wider than the usual 0.02, so scores differ clearly between
    texts) from `seed`, so the same call always saves the same model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = Path(folder)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        **_llama_shape(tokenizer, hidden_size, num_layers),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


class EchoBackend:
    """A deterministic stand-in engine: fast, seed-sensitive, and it logs every request.

    Text is a hash of (chat, seed, sample), so tests can check that seeds, batching and
    resumption behave exactly like a real engine's would, at no model cost. `score_fn` scripts
    the option probabilities for judge tests; by default every option is equally likely.
    """

    def __init__(
        self, model_id: str = "echo", score_fn=None, log_path: str | Path | None = None, delay: float = 0.0
    ):
        from cai.backends.base import Usage

        self.model_id = model_id
        self.usage = Usage()
        self.calls: list[tuple[str, list]] = []
        self.score_fn = score_fn
        self.log_path = Path(log_path) if log_path else None
        self.delay = delay

    def _log(self, kind: str, items: list) -> None:
        import json
        import time

        self.calls.append((kind, items))
        if self.log_path:
            with self.log_path.open("a") as handle:
                handle.write(json.dumps({"kind": kind, "items": items}) + "\n")
        if self.delay:
            time.sleep(self.delay)

    def generate(self, chats, params):
        import hashlib

        from cai.backends.base import Completion, Sample

        self._log("generate", [chat[-1]["content"] for chat in chats])
        out = []
        for index, chat in enumerate(chats):
            samples = []
            for k in range(params.n):
                key = repr((chat, params.seed, index, k)).encode()
                digest = hashlib.sha256(key).hexdigest()[:12]
                text = f"answer-{digest}"
                for stop in params.stop:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                samples.append(Sample(text=text, tokens=3, finish_reason="stop"))
            out.append(Completion(samples=samples, prompt_tokens=len(str(chat)) // 4))
        self.usage.generate_calls += 1
        self.usage.prompt_tokens += sum(c.prompt_tokens for c in out)
        self.usage.completion_tokens += sum(3 * params.n for _ in out)
        return out

    def score_choices(self, prompts, options):
        from cai.backends.base import ChoiceScores

        self._log("score", [p.chat[-1]["content"] for p in prompts])
        self.usage.score_calls += 1
        results = []
        for prompt in prompts:
            if self.score_fn is None:
                logprobs = [0.0] * len(options)
            else:
                import math

                probs = self.score_fn(prompt, list(options))
                logprobs = [math.log(p) if p > 0 else float("-inf") for p in probs]
            results.append(ChoiceScores.from_logprobs(options, logprobs, prompt_tokens=len(str(prompt)) // 4))
        return results

    def close(self) -> None:
        pass
