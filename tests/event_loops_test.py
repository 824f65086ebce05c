"""Event loops that finish their tasks before closing: a failed gather leaves nothing behind."""

import asyncio
import gc

import pytest

from mixtral_jax.runtime import event_loops


@pytest.fixture
def policy():
  """policy(drain): this test's new loops drain (event_loops.install) or are asyncio's own."""
  before = asyncio.get_event_loop_policy()

  def use(drain: bool) -> None:
    asyncio.set_event_loop_policy(None)  # asyncio's default (a checkpoint test may have installed)
    if drain:
      event_loops.install()
      event_loops.install()  # idempotent

  yield use
  asyncio.set_event_loop_policy(before)


def _fail_fast_among_slow_tasks(finished: list) -> None:
  """What Orbax does: gathers a read per shard, one fails at once, the loop is closed."""

  async def slow(i):
    await asyncio.sleep(0.05)
    finished.append(i)

  async def fail():
    raise OSError("this shard does not read back")

  async def read_all():
    await asyncio.gather(slow(0), fail(), slow(1))

  loop = asyncio.new_event_loop()
  with pytest.raises(OSError):
    loop.run_until_complete(read_all())
  loop.close()


def test_a_closed_loop_has_run_its_tasks_to_their_end(policy):
  policy(drain=True)
  unraisable = []
  finished = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("sys.unraisablehook", unraisable.append)
    _fail_fast_among_slow_tasks(finished)
    gc.collect()
  assert sorted(finished) == [0, 1]
  assert unraisable == []


def test_without_it_the_tasks_are_abandoned(policy):
  policy(drain=False)
  finished = []
  _fail_fast_among_slow_tasks(finished)
  assert finished == []  # what the draining loop prevents
