"""PPO end to end on the tiny model: learning, the reference, resume, NaN guard, ptx, DDP, vLLM sync.

The rule reward used throughout is the share of response tokens whose id is a multiple of 8: an
untrained tiny model hits it 1/8 of the time, and PPO can raise that in a few dozen steps.
Everything is seeded, so each run is deterministic on a given machine; the assertions still
leave wide margins so they do not depend on one CPU's rounding.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai.sections import SamplingParams
from cai.train.ppo.config import PPOConfig
from cai.train.ppo.data import load_prompts
from cai.train.ppo.monitor import warning_signs
from cai.train.ppo.trainer import NonFiniteError, PPOTrainer
from cai.train.ppo.update import ptx_loss

REPO = Path(__file__).resolve().parents[1]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
TINY_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """One thread (tiny matmuls only lose to thread hand-offs, more so on a busy machine) and a
    fresh accelerate state, so another test's Accelerator settings cannot leak into these."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(["red_team"])


@pytest.fixture(scope="module")
def token_share(tiny_models):
    """Reward: share of the response's tokens (re-tokenised) with an id divisible by 8."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)

    def reward(chats, responses):
        out = []
        for text in responses:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(sum(i % 8 == 0 for i in ids) / max(len(ids), 1))
        return out

    return reward


def config(**overrides) -> PPOConfig:
    base = dict(
        steps=4,
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        learning_rate=2e-2,
        lora=None,
        sampling=SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0),
        precision="fp32",
        save_every=0,
    )
    base.update(overrides)
    return PPOConfig(**base)


def make_trainer(tiny_models, prompts, reward, out, **overrides) -> PPOTrainer:
    return PPOTrainer(
        config(**overrides),
        policy=str(tiny_models.causal_lm),
        reward_fn=reward,
        prompts=prompts,
        output_dir=out,
    )


def trainable(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------ learning


def test_reward_rises_with_bounded_kl_and_frozen_reference(tiny_models, prompts, token_share, tmp_path):
    """30 steps of full fine-tuning with an adaptive KL controller (fast horizon, target 10)."""
    trainer = make_trainer(
        tiny_models,
        prompts,
        token_share,
        tmp_path,
        steps=30,
        kl={"kind": "adaptive", "init_coef": 0.05, "target": 10.0, "horizon": 16},
        report_to=["tensorboard"] if HAS_TENSORBOARD else [],
    )
    before = trainable(trainer)
    reference_before = {k: v.clone() for k, v in trainer.reference.frozen.state_dict().items()}
    result = trainer.train()
    history = result.history

    rewards = [row["reward"] for row in history]
    kls = [row["kl"] for row in history]
    first, last = mean(rewards[:5]), mean(rewards[-5:])
    assert last > first + 0.3, f"reward did not rise: first 5 {first:.3f}, last 5 {last:.3f}"
    # A policy collapsed onto one token would sit ~8 * ln(|V|) ~ 50 nats from the reference.
    assert all(math.isfinite(k) for k in kls) and max(kls) < 40, kls
    # The adaptive controller pushed back once the KL overshot its target.
    assert max(kls) > 10 and history[-1]["kl_coef"] > max(r["kl_coef"] for r in history[:10])
    assert history[-1]["entropy"] > 0.5  # not collapsed
    for key in ("clipfrac", "approx_kl", "value_loss", "policy_loss", "response_length", "reward_std"):
        assert all(math.isfinite(row[key]) for row in history), key

    after = trainable(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"parameters that never changed: {unchanged}"
    for key, value in trainer.reference.frozen.state_dict().items():
        assert torch.equal(value, reference_before[key]), f"reference changed: {key}"
    if HAS_TENSORBOARD:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # The exported policy is a plain causal LM that reproduces the trained policy's logits.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(result.policy_path)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected, _ = trainer.policy(ids, torch.ones_like(ids))
        torch.testing.assert_close(exported(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "ppo_result.json").read_text())["steps"] == 30


def test_lora_reference_is_the_base_with_the_adapter_disabled(tiny_models, prompts, tmp_path):
    """One copy of the base weights; adapter and value head train; base and reference stay put.

    The reward here is the tiny sequence classifier through the PM's scorer (the real path)."""
    from transformers import AutoModelForCausalLM

    from cai.train.pm_metrics import PreferenceScorer

    pm = PreferenceScorer(tiny_models.classifier).score
    trainer = make_trainer(tiny_models, prompts, pm, tmp_path, steps=3, lora=TINY_LORA, learning_rate=1e-2)
    assert trainer.reference.frozen is None
    base = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    n_base = sum(p.numel() for p in base.parameters())
    n_adapter = sum(p.numel() for n, p in trainer.policy.named_parameters() if "lora_" in n)
    n_head = sum(p.numel() for p in trainer.policy.value_head.parameters())
    # Every parameter the trainer holds: the base once, the adapters, the value head. Nothing else.
    assert sum(p.numel() for p in trainer.policy.parameters()) == n_base + n_adapter + n_head
    frozen_before = {
        n: p.detach().clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad
    }
    assert all("lora_" not in n and "value_head" not in n for n in frozen_before)
    before = trainable(trainer)

    trainer.train()

    after = trainable(trainer)
    assert all(not torch.equal(before[n], after[n]) for n in before), (
        "an adapter/value-head tensor never changed"
    )
    for name, param in trainer.policy.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), f"base weight changed: {name}"
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = trainer.reference.logits(ids, mask)
        policy, _ = trainer.policy(ids, mask)
        torch.testing.assert_close(
            reference, base(ids).logits, atol=1e-6, rtol=1e-6
        )  # reference == SFT model
    assert not torch.allclose(policy, reference, atol=1e-4)  # the adapter is active outside the context

    # Checkpoints hold the adapter and value head only, not another copy of the base.
    from safetensors import safe_open

    checkpoint = trainer.latest_checkpoint()
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(before)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")  # merged, loads as a plain LM
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, policy, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ resume


class _Kill(BaseException):
    """Stands in for SIGKILL/Ctrl-C: not an Exception, so nothing on the way out handles it."""


@pytest.mark.parametrize("lora", [None, TINY_LORA], ids=["full", "lora"])
def test_resume_matches_an_uninterrupted_run(tiny_models, prompts, token_share, tmp_path, lora):
    settings = dict(
        steps=4,
        save_every=1,
        lora=lora,
        kl={"kind": "adaptive", "init_coef": 0.05, "target": 1.0, "horizon": 32},
    )
    straight = make_trainer(tiny_models, prompts, token_share, tmp_path / "straight", **settings)
    reference = straight.train()

    calls = {"n": 0}

    def dies_on_step_3(chats, responses):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Kill()
        return token_share(chats, responses)

    first = make_trainer(tiny_models, prompts, dies_on_step_3, tmp_path / "killed", **settings)
    with pytest.raises(_Kill):
        first.train()
    assert first.latest_checkpoint().name == "step-000002"
    del first

    resumed = make_trainer(tiny_models, prompts, token_share, tmp_path / "killed", **settings)
    result = resumed.train()
    assert result.resumed_from_step == 2 and result.steps == 4

    expected, got = trainable(straight), trainable(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, rel=1e-9)
    assert straight.kl_ctl.value != 0.05  # the controller moved, so restoring it was tested
    assert resumed.moments.state_dict() == pytest.approx(straight.moments.state_dict())
    assert [r["reward"] for r in result.history] == pytest.approx([r["reward"] for r in reference.history])
    state = json.loads((resumed.latest_checkpoint() / "trainer_state.json").read_text())
    assert state["data_position"] == 4 * 8  # steps x prompts per step
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints

    # Resuming under a changed config is refused rather than silently mixing two runs.
    changed = make_trainer(
        tiny_models, prompts, token_share, tmp_path / "killed", **{**settings, "learning_rate": 1e-3}
    )
    with pytest.raises(ValueError, match="different PPO config"):
        changed.train()


# ------------------------------------------------------------------------------------ NaN guard


def _nan_on_call(reward, bad_call: int):
    calls = {"n": 0}

    def fn(chats, responses):
        calls["n"] += 1
        scores = reward(chats, responses)
        return [float("nan")] + scores[1:] if calls["n"] == bad_call else scores

    return fn


def test_nan_reward_is_skipped_and_counted(tiny_models, prompts, token_share, tmp_path):
    trainer = make_trainer(
        tiny_models, prompts, _nan_on_call(token_share, 3), tmp_path, steps=5, save_every=1
    )
    before = trainable(trainer)
    result = trainer.train()
    assert result.steps == 5 and result.nan_skipped_steps == 1
    assert [row["nan_skipped"] for row in result.history] == [False, False, True, False, False]
    assert any("non-finite" in w for w in result.warnings)
    after = trainable(trainer)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # training went on
    assert trainer.moments.count == 4 * 8  # the poisoned batch never reached the running moments


def test_nan_reward_halts_and_leaves_the_last_checkpoint_intact(tiny_models, prompts, token_share, tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(
        tiny_models, prompts, _nan_on_call(token_share, 3), tmp_path, steps=5, save_every=1, nan_policy="halt"
    )
    with pytest.raises(NonFiniteError, match=r"step 3: the reward function returned 1 non-finite"):
        trainer.train()
    checkpoint = trainer.latest_checkpoint()
    assert checkpoint.name == "step-000002"
    assert not list(checkpoint.parent.glob(".*.tmp"))  # no half-written checkpoint left behind
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2 and not any(row["nan_skipped"] for row in state["history"])
    # and a new trainer resumes from it
    resumed = make_trainer(
        tiny_models, prompts, token_share, tmp_path, steps=3, save_every=1, nan_policy="halt"
    )
    assert resumed.train().resumed_from_step == 2


# ------------------------------------------------------------------------------------ PPO-ptx


def test_ptx_term_changes_the_update_only_when_its_coefficient_is_positive(
    tiny_models, prompts, token_share, tmp_path
):
    runs = {}
    for name, ptx in (("none", None), ("zero", {"coef": 0.0}), ("on", {"coef": 0.5})):
        trainer = make_trainer(tiny_models, prompts, token_share, tmp_path / name, steps=1, ptx=ptx)
        result = trainer.train()
        runs[name] = (trainer, result.history[0])
    none, zero, on = runs["none"], runs["zero"], runs["on"]
    assert zero[1]["ptx_loss"] > 0 and math.isfinite(zero[1]["ptx_loss"])
    # coef 0: the same loss and bit-identical weights as no ptx at all
    assert zero[1]["loss"] == pytest.approx(none[1]["loss"], abs=1e-12)
    for n, p in trainable(none[0]).items():
        assert torch.equal(p, trainable(zero[0])[n]), n
    # coef 0.5: the logged loss includes 0.5 x the LM loss, and the update differs
    assert on[1]["loss"] == pytest.approx(
        on[1]["policy_loss"] + 0.1 * on[1]["value_loss"] + 0.5 * on[1]["ptx_loss"], rel=1e-5
    )
    changed = trainable(on[0])
    assert any(not torch.equal(p, trainable(none[0])[n]) for n, p in changed.items())


def test_ptx_loss_is_the_mean_token_nll(tiny_models, prompts, token_share, tmp_path):
    """Against a direct computation with torch's cross-entropy (padding excluded)."""
    trainer = make_trainer(tiny_models, prompts, token_share, tmp_path, ptx={"coef": 1.0, "batch_size": 3})
    batch = trainer.data.ptx_batch(0, trainer.accelerator.device)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is present
    with torch.no_grad():
        got = ptx_loss(trainer.model, batch, trainer.bf16)
        logits = trainer.policy.lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ pure pieces


def _row(step, reward=0.5, reward_std=0.2, kl=1.0, length=8.0):
    return {"step": step, "reward": reward, "reward_std": reward_std, "kl": kl, "response_length": length}


def test_warning_signs():
    cfg = config(kl_warn=20.0, warn_patience=3)
    calm = [_row(i, reward=0.5 + 0.01 * (i % 3)) for i in range(10)]
    assert warning_signs(calm, cfg) == {}
    assert set(warning_signs(calm[:-3] + [_row(i, kl=25) for i in range(3)], cfg)) == {"kl"}
    assert (
        set(warning_signs(calm[:-2] + [_row(8, kl=25), _row(9, kl=25)], cfg)) == set()
    )  # not for long enough
    assert set(warning_signs(calm[:-3] + [_row(i, reward_std=0.0) for i in range(3)], cfg)) == {
        "reward_collapse"
    }
    assert set(warning_signs(calm + [_row(10, reward=3.0)], cfg)) == {"reward_jump"}
    assert set(warning_signs(calm[:-3] + [_row(i, length=1.0) for i in range(3)], cfg)) == {"length"}
    assert warning_signs(calm[:-1] + [{"step": 10, "nan_skipped": True}], cfg) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_batch_size": 6, "mini_batch_size": 4}, "must divide"),
        ({"sampling": SamplingParams(stop=["\n"])}, "stop"),
        ({"sampling": SamplingParams(temperature=0)}, "temperature"),
        ({"sampling": SamplingParams(temperature=1.0, top_p=0.9)}, r"ppo\.sampling\.top_p must be 1"),
        ({"kl": {"kind": "adaptive", "init_coef": 0.0}}, "init_coef"),
        ({"unknown_key": 1}, "Extra inputs"),
    ],
)
def test_config_rejects_inconsistent_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_shipped_configs_sample_ppo_rollouts_from_the_full_softmax():
    from cai.config import load_config
    from cai.resources import shipped_dir

    for path in sorted(shipped_dir("configs").glob("*.yaml")):
        assert load_config(path).ppo.sampling.top_p == 1.0, path.name


def test_top_p_below_one_is_a_config_error_naming_the_field(tmp_path):
    from cai.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("ppo:\n  sampling: {max_new_tokens: 8, temperature: 1.0, top_p: 0.9}\n")
    with pytest.raises(ConfigError, match=r"ppo\.sampling\.top_p must be 1.*full softmax"):
        load_config(path)


# ------------------------------------------------------------------------------------ distributed


@pytest.mark.distributed
def test_two_process_ddp_keeps_ranks_identical(tiny_models, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: gloo DDP, 3 PPO steps.

    (accelerate's `--cpu` flag alone starts a single process unless mpirun is configured; the
    trainer asks for cpu=True itself on machines without CUDA, which makes the torchrun launch
    use gloo.)
    """
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO / "tests" / "ppo_distributed_script.py"), str(tiny_models.causal_lm), str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), f"ranks differ in {name}"
    assert set(ranks[0]["prompts"]).isdisjoint(ranks[1]["prompts"])  # each rank rolled out its own prompts
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"] and ranks[0]["moments"] == ranks[1]["moments"]
    assert ranks[0]["moments"]["count"] == 3 * 2 * 4  # scores of both ranks were gathered
    assert (out / "run" / "checkpoints" / "step-000003" / "random_states_1.pkl").is_file()
    print(f"2-process DDP PPO: {elapsed:.1f}s")


# ------------------------------------------------------------------------------------ vLLM


@pytest.mark.engines
def test_vllm_weight_sync_makes_vllm_generate_like_the_trained_policy(default_model_path):
    """Perturb a LoRA policy, push it into vLLM, and compare greedy tokens with transformers."""
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer

    from cai.train.common import LoraSection
    from cai.train.ppo.policy import VLLMRollout, load_policy

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    engine = VLLMRollout(default_model_path, tokenizer, dtype="float32")
    chat = [{"role": "user", "content": "Name three colours."}]
    greedy = SamplingParams(max_new_tokens=8, temperature=0, seed=0)
    before = engine.generate([chat], greedy)[0].samples[0].token_ids

    policy, _ = load_policy(default_model_path, LoraSection(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    engine.sync(policy)
    after = engine.generate([chat], greedy)[0].samples[0].token_ids

    ids = torch.tensor([engine.encode_chat(chat)])
    with torch.no_grad():
        out = policy.lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    expected = [t for t in out[0, ids.shape[1] :].tolist() if t != tokenizer.eos_token_id]
    engine.close()
    assert after != before  # the new weights are in use
    assert after == expected  # and they are the policy's (LoRA merged) weights
