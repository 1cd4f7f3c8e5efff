"""A Ray worker setup hook for tests/test_serve_inputs.py: a latent body holding the bytes HOLD-PARSE takes 6 s to
parse, standing in for a heavy latent file (the endpoint must keep answering others meanwhile)."""

import time


def install():
    from pipeline.stages.latent import LatentStage

    real = LatentStage.process

    def held(self, row):
        if b"HOLD-PARSE" in bytes(row.get("bytes", b""))[:4096]:
            time.sleep(6)
        return real(self, row)

    LatentStage.process = held
