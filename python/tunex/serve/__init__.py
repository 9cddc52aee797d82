"""``tunex serve``: an OpenAI-compatible HTTP API over tunex's decoder, with LoRA adapters selected per
request on one shared base.

engine.py runs generation (one worker thread, a FIFO of jobs, adapters swapped in per job);
app.py is the HTTP layer (starlette, served by uvicorn), which only validates requests, queues jobs
and turns their events into OpenAI-shaped JSON or server-sent events.
"""

from tunex.serve.engine import Engine, Job, JobResult, ServeError

__all__ = ["Engine", "Job", "JobResult", "ServeError"]
