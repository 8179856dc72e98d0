"""Where ovfast's configuration comes from.

``environment`` is the one module that reads environment variables (for ovfast and ovfast.kernels);
each variable only gives a default, read when asked for, and nothing here writes ``os.environ``
except the one documented NCCL default. docs/configuration.md lists the variables.

May import: ``ovfast.errors`` only; every stage may import it.
"""
