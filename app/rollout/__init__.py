"""Rollout: comparing a candidate model version with the live one (replay now, shadow traffic later).

Torch-free, so that the gateway may import it: `app.rollout.compare` joins live and candidate
answers by request id; `app.rollout.report` writes what a comparison found as Markdown with plots.
"""
