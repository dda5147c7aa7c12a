"""MOD decoding through transformers' ``custom_generate`` hook (this directory is the "repository" it loads):

    model.generate(**inputs, custom_generate=sipo_fast.decoding.custom_generate_dir(), trust_remote_code=True,
                   policies=[other_model], weights=[0.4, 0.6], max_new_tokens=64)

The function is :func:`sipo_fast.decoding.hub.generate`; see its docstring.
"""
from sipo_fast.decoding.hub import generate  # noqa: F401  (transformers looks up ``generate`` in this module)
