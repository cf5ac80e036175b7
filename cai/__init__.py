"""cai: Constitutional AI (RLAIF) end to end.

`cai --help` lists the stages. Importing this package is cheap: torch, transformers, trl and
vllm are imported by the stage that needs them, never here.
"""

__version__ = "0.1.0"
