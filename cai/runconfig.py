"""The whole run config: the shared settings of `cai.config.RunConfig` plus one section per stage.

Each stage owns its section (defined next to the code that reads it); this module only puts
them together. It is separate from `cai.config` so stage modules can import `Section` from
there without an import cycle.
"""

from __future__ import annotations

from pydantic import Field

from cai.config import RunConfig as BaseRunConfig
from cai.critique import SLConfig


class RunConfig(BaseRunConfig):
    sl: SLConfig = Field(default_factory=SLConfig, description="Supervised stage: critique -> revision.")
