"""The whole run config: the shared settings of `cai.config.RunConfig` plus one section per stage.

Each stage owns its section (defined next to the code that reads it); this module only puts
them together. It is separate from `cai.config` so stage modules can import `Section` from
there without an import cycle.
"""

from __future__ import annotations

from pydantic import Field

from cai.config import RunConfig as BaseRunConfig
from cai.critique import SLConfig
from cai.judge import LabelConfig
from cai.mix import MixConfig
from cai.train.dpo import DPOConfig
from cai.train.reward import PMConfig
from cai.train.rloo import RLOOConfig
from cai.train.sft import SFTConfig


class RunConfig(BaseRunConfig):
    sl: SLConfig = Field(default_factory=SLConfig, description="Supervised stage: critique -> revision.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Fine-tuning on the final revisions.")
    label: LabelConfig = Field(default_factory=LabelConfig, description="Feedback stage: AI preference labels.")
    mix: MixConfig = Field(default_factory=MixConfig, description="AI harmlessness + human helpfulness mix.")
    pm: PMConfig = Field(default_factory=PMConfig, description="Preference model on the mix.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO on the mix (alternative to PM + PPO).")
    rloo: RLOOConfig = Field(default_factory=RLOOConfig, description="RLOO against the PM (alternative to PPO).")
