"""The LoRA trainer worker: one process per training run, fed through Redis.

Modules: ``losses`` (pure torch loss functions), ``model`` (base + PEFT LoRA), ``engine``
(forward/backward, micro-batching, AdamW), ``checkpoint`` (object-store files), ``ordering``
(seq buffer), ``training`` (what each op does), ``worker`` (the Redis loop).
Run it with ``python -m data_plane.trainer``.
"""
