"""A check that records the events it sees (to pin event order under each trainer)."""

from callbacks.checks.base import Check


class RecordingCheck(Check):
    """Records (event, phase, step) of every event; reports nothing."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.seen = []
        self.clipped = []

    def run(self, ctx):
        self.seen.append((ctx.event, ctx.phase, ctx.step))
        if ctx.phase == "before_optimizer":
            self.clipped.append(ctx.grads_clipped)
        return []
