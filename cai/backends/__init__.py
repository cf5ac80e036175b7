"""Engines behind one protocol (`cai.backends.base.Backend`), chosen by `engine.kind` in config.

    from cai.backends.registry import make_backend
    backend = make_backend(config.engine, config.model)

Importing this package is cheap: each engine module (and torch, vllm or openai with it) is
imported only when `make_backend` builds that engine.
"""
