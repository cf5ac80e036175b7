"""A few PPO steps under `accelerate launch`, for tests/test_ppo_trainer.py (marked distributed).

    accelerate launch --multi_gpu --num_processes 2 tests/ppo_distributed_script.py TINY_LM OUT_DIR

(On a machine without CUDA the trainer asks accelerate for cpu=True, so this is gloo DDP;
`accelerate launch --cpu` alone starts a single process unless mpirun is configured.)

Each process writes what it ended with (trainable weights, the prompts it rolled out, its
history) to OUT_DIR/rank-<i>.pt so the test can compare the processes.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(model: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)  # two processes share the cores; more threads only contend

    from cai.sections import SamplingParams
    from cai.train.ppo.config import PPOConfig
    from cai.train.ppo.data import load_prompts
    from cai.train.ppo.trainer import PPOTrainer

    def reward(prompts, responses):  # longer responses score higher: any signal will do here
        return [len(r) / 10.0 for r in responses]

    config = PPOConfig(
        steps=3,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        learning_rate=1e-2,
        lora=None,
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0),
        precision="fp32",
        save_every=3,
    )
    trainer = PPOTrainer(
        config,
        policy=model,
        reward_fn=reward,
        prompts=load_prompts(["red_team"]),
        output_dir=os.path.join(out, "run"),
    )
    result = trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "weights": {k: v.detach().cpu().clone() for k, v in trainer.policy.state_dict().items()},
            "prompts": [chat[-1]["content"] for step in range(3) for chat in trainer.data.prompts_for(step)],
            "history": result.history,
            "world_size": trainer.accelerator.num_processes,
            "kl_coef": trainer.kl_ctl.value,
            "moments": trainer.moments.state_dict(),
        },
        os.path.join(out, f"rank-{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
