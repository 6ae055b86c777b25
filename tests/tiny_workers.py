"""A model-free Ray worker for tests of `kvcompress.distributed` (imports nothing, so it starts fast)."""


class Doubler:
    """A model-free worker for `kvcompress.distributed.run_on_actors` (starts in about a second)."""

    def __init__(self, fail_start: bool = False):
        self.error = "ValueError: no such model" if fail_start else None

    def ready(self):
        return self.error

    def work(self, unit: int) -> int:
        return 2 * unit
