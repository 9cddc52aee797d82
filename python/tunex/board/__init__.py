"""``tunex board``: a small local web page over a work dir (or a folder of them) that follows a run
while it trains: loss, eval and learning-rate curves, tokens/s, the eval answers per step, the
config and the checkpoints.

The page is static HTML + a little JavaScript over Chart.js (vendored in ``static/`` with its
license, so nothing is fetched from the network); it polls a JSON view of the work dir
(:mod:`tunex.board.runs`) that the stdlib HTTP server (:mod:`tunex.board.server`) reads from disk
on every request.
"""
