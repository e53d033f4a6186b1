"""Who is asked each round: the site sampler, reproducible without DP and secret under it.

Privacy amplification by sampling (the smaller epsilon a sampled round
spends) holds only against whoever cannot predict the sample. The run
configuration, seed included, travels to every site in every message, so a
sample drawn from ``random.Random(config.seed)`` is known to all of them.
Under DP noise the coordinator therefore draws from :class:`SecretRandom`:
a generator keyed by 32 bytes from the operating system's CSPRNG whose key
lives only in the coordinator's checkpoint (never in a message, the
configuration or the base model), so a resumed run samples exactly as an
uninterrupted one and nobody else can replay it.

What this assumes, and what is tested (``tests/test_fl_sampling.py``): the
key is not derived from the configuration (two runs of one configuration
sample differently); the state restores exactly (a resumed run draws the
same sites); the draw is uniform over sites (the account's
``SampledWithoutReplacementDpEvent``). SecAgg+ tells each sampled site who
else was sampled, which is why the account also reports epsilon against a
participant who knows the sample (:class:`fedmeta.fl.privacy.PrivacyAccount`).

>>> a, b = SecretRandom(), SecretRandom()
>>> a.sample(range(1000), 5) == b.sample(range(1000), 5)  # independent keys
False
>>> c = SecretRandom(); c.setstate(a.getstate()); a.random() == c.random()
True
"""

from __future__ import annotations

import hashlib
import random
import secrets

from fedmeta.fl.config import RunConfig


class SecretRandom(random.Random):
    """``random.Random`` over BLAKE2b in counter mode, keyed from the OS's CSPRNG.

    Subclassing ``random.Random`` with its own ``random``/``getrandbits``
    (as its documentation describes) keeps ``sample``, ``shuffle`` and
    ``random`` with their usual semantics. The state is ``(key, counter)``:
    small, exact to checkpoint, and useless to anyone who does not hold it.
    """

    _BLOCK = 64  # bytes per BLAKE2b output

    def __init__(self, key: bytes | None = None):
        self._key = key if key is not None else secrets.token_bytes(32)
        if len(self._key) != 32:
            raise ValueError(f"a SecretRandom key has 32 bytes, got {len(self._key)}")
        self._counter = 0
        super().__init__()

    def seed(self, a=None, version: int = 2) -> None:  # noqa: D401 - random.Random calls it from __init__
        """Ignored: the generator is keyed from the CSPRNG, never from a seed someone else could know."""

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        nbytes = (k + 7) // 8
        out = bytearray()
        while len(out) < nbytes:
            out += hashlib.blake2b(self._counter.to_bytes(16, "little"), key=self._key, digest_size=self._BLOCK).digest()
            self._counter += 1
        return int.from_bytes(out[:nbytes], "little") >> (8 * nbytes - k) if k else 0

    def random(self) -> float:
        return self.getrandbits(53) / (1 << 53)

    def getstate(self) -> tuple:
        return ("secret-blake2b", self._key, self._counter)

    def setstate(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 3 and state[0] == "secret-blake2b"):
            raise ValueError("not a SecretRandom state (a checkpoint written without DP sampling?)")
        self._key, self._counter = bytes(state[1]), int(state[2])


def site_sampler(config: RunConfig) -> random.Random:
    """The run's site sampler: secret under DP noise, ``random.Random(config.seed)`` otherwise (reproducible)."""
    return SecretRandom() if config.privacy.accounted else random.Random(config.seed)


def restore_sampler(config: RunConfig, state) -> random.Random:
    """The sampler a checkpoint recorded; refuses to swap a secret sampler for a seeded one or back."""
    sampler = site_sampler(config)
    try:
        sampler.setstate(state)
    except (TypeError, ValueError) as e:
        kind = "a secret (DP) sampler" if isinstance(sampler, SecretRandom) else "a seeded sampler"
        raise ValueError(f"the checkpoint's site sampler does not fit this run, which needs {kind}: {e}") from None
    return sampler
