"""A keyed random permutation of range(n) evaluated one position at a time: the epoch order of
a corpus of any size, with nothing stored."""

_MASK64, _GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
  """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
  x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
  return x ^ (x >> 31)


def permute(index: int, n: int, key: tuple[int, ...]) -> int:
  """Position `index` of a keyed random permutation of range(n), in O(1) time and memory.

  A 4-round Feistel network is a bijection on 2^(2h) ≥ n values; stepping again while the result
  is ≥ n (cycle walking) restricts it to range(n). Unlike a stored permutation this scales to
  corpora of billions of documents.
  """
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1
  seed = 0
  for value in key:
    seed = _mix(seed ^ _mix((value + _GOLDEN) & _MASK64))
  round_keys = [_mix(seed + r) for r in range(4)]
  x = index
  while True:
    left, right = x >> half, x & mask
    for round_key in round_keys:
      left, right = right, left ^ (_mix(right ^ round_key) & mask)
    x = (left << half) | right
    if x < n:
      return x
