"""Event loops that finish their tasks before they close.

Orbax runs each checkpoint read and write as a fresh asyncio loop over many tasks (one per array
shard), gathered. When one fails (a truncated file, a full disk) the gather raises at once and
the loop is closed with the other tasks still waiting on TensorStore. They are then left to the
garbage collector and to TensorStore's threads: "Exception ignored in: <coroutine …>", "Event
loop is closed" and "Task exception was never retrieved" tracebacks, by the hundred, printed
after the one line that reported the failure, even after the process began to exit.

`install()` makes every new loop of the process (Orbax's included: it asks asyncio's policy for
them) let its unfinished tasks run to their end, and collect their results and errors, before it
closes. They were going to run anyway; now they end while their loop can still hear them.
"""

import asyncio


class _DrainingLoop(asyncio.SelectorEventLoop):
  """A loop whose close() first runs its unfinished tasks to their end."""

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


def install() -> None:
  """Makes the process's new event loops drain before they close (idempotent)."""
  if not isinstance(asyncio.get_event_loop_policy(), _DrainingPolicy):
    asyncio.set_event_loop_policy(_DrainingPolicy())
