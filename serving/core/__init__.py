"""The native data plane: a C++ core (``serving/core/src``, built into ``serving.core._native``)
owns the step path (transport, sessions, batching, states); Python keeps the model runner, called
once per batch, and answers the RPCs that are not steps through one generic bridge.

``serving.core.server.NativeServer`` is the Python face of it; ``serving.server.create_server``
builds one from a ``ServerConfig``.
"""

import importlib
import importlib.util
import os
from types import ModuleType

NATIVE_LIB_ENV = "RNNSERVE_NATIVE_LIB"


def load_native() -> ModuleType:
    """The compiled core: the package's own build, or the file $RNNSERVE_NATIVE_LIB names (the
    sanitizer build ``make test-asan`` runs the integration tests against)."""
    path = os.environ.get(NATIVE_LIB_ENV)
    if not path:
        return importlib.import_module("serving.core._native")
    spec = importlib.util.spec_from_file_location("serving.core._native", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"${NATIVE_LIB_ENV}={path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
