"""TorchServe adapter: the handler TorchServe workers run, archive building, and start/stop.

See docs/torchserve.md for the request and response formats.
"""
