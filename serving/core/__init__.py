"""The native data plane: a C++ core (``serving/core/src``, built into ``serving.core._native``)
owns the step path (transport, sessions, batching, states); Python keeps the model runner, called
once per batch, and answers the RPCs that are not steps through one generic bridge.

``serving.core.server.NativeServer`` is the Python face of it, with the same life cycle as the
Python data plane's ``serving.server.RnnServer`` (``create_server`` picks one by
``ServerConfig.data_plane``).
"""
