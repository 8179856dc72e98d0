"""Adapters that let other tools drive an ovfast engine (extra dependencies, imported on demand).

``lmms_eval``: the ``ovfast`` model of lmms-eval (extra ``ovfast[lmms-eval]``), registered through
the ``lmms_eval.models`` entry point. May import the runtime, inputs and errors; nothing in
ovfast imports it.
"""
