"""The whole run config: the shared settings of `cai.config.RunConfig` plus one section per stage.

Each stage owns its section (defined next to the code that reads it); this module only puts
them together. It is separate from `cai.config` so stage modules can import `Section` from
there without an import cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cai.config import RunConfig as BaseRunConfig
from cai.critique import SLConfig
from cai.evaluate import EvalConfig
from cai.judge import LabelConfig
from cai.mix import MixConfig
from cai.train.dpo import DPOConfig
from cai.train.ppo.config import PPOConfig
from cai.train.reward import PMConfig
from cai.train.rloo import RLOOConfig
from cai.train.sft import SFTConfig

StageName = Literal["sl", "sft", "label", "mix", "pm", "ppo", "dpo", "rloo", "eval", "report"]


class RunConfig(BaseRunConfig):
    sl: SLConfig = Field(default_factory=SLConfig, description="Supervised stage: critique -> revision.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Fine-tuning on the final revisions.")
    label: LabelConfig = Field(
        default_factory=LabelConfig, description="Feedback stage: AI preference labels."
    )
    mix: MixConfig = Field(default_factory=MixConfig, description="AI harmlessness + human helpfulness mix.")
    pm: PMConfig = Field(default_factory=PMConfig, description="Preference model on the mix.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO on the mix (alternative to PM + PPO).")
    rloo: RLOOConfig = Field(
        default_factory=RLOOConfig, description="RLOO against the PM (alternative to PPO)."
    )
    ppo: PPOConfig = Field(
        default_factory=PPOConfig, description="Our PPO against the PM, KL to the SFT model."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Policy comparison with the judge.")
    stages: list[StageName] = Field(
        default_factory=lambda: ["sl", "sft", "label", "mix", "pm", "ppo", "eval", "report"],
        description="Stages `cai run` runs, in this order (dpo and rloo are optional alternatives).",
    )

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list[str]) -> list[str]:
        from cai.stages.registry import STAGE_ORDER

        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        if stages != sorted(stages, key=STAGE_ORDER.index):
            raise ValueError(f"stages must follow the order {', '.join(STAGE_ORDER)}")
        return stages
