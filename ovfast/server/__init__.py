"""``ovfast serve``: the OpenAI-compatible HTTP layer over ``Engine.submit`` (extra ``ovfast[serve]``).

``media`` (where request media may come from), ``protocol`` (OpenAI bodies to engine calls and
back), ``metrics`` (Prometheus), ``app`` (the FastAPI endpoints), ``main`` (the command, uvicorn,
SIGTERM drain). May import the runtime, inputs, settings and errors; nothing below imports it.
"""
