"""What the rollout side raises. Every module of rollout/ imports these from here, so none has to
reach into the pool (or anywhere above it) for an exception."""


class EngineDied(RuntimeError):
    """An engine process exited or its connection closed."""


class EngineTimeout(TimeoutError):
    """An engine did not answer a request in time."""


class EngineError(RuntimeError):
    """An engine raised while serving a request (its traceback is in the message)."""
