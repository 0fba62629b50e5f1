"""Phase timings a stage reports in its returned metrics (`<stage>/seconds_<phase>`).

A stage splits its run into phases with one `lap` call at the end of each span:

    clock = PhaseClock("rollout")
    ...load the prompts and the policy...
    clock.lap("io")
    ...generate...
    clock.lap("generate")
    return {**metrics, **clock.metrics()}

Each lap adds the wall and CPU seconds since the previous lap (or since the clock was
made) to its phase, so the phases tile the stage without gaps: their sum is the time from
the clock's start to its last lap. CPU seconds are this process's (all threads), so
`cpu_seconds_<phase> / seconds_<phase>` shows how many cores the phase kept busy.
"""

from __future__ import annotations

import time


class PhaseClock:
    """Wall and CPU seconds per named phase of one stage run."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (phases may recur: they add up)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[phase] = self.wall.get(phase, 0.0) + wall - self._wall0
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - self._cpu0
        self._wall0, self._cpu0 = wall, cpu

    def metrics(self) -> dict[str, float]:
        """`<stage>/seconds_<phase>` (wall) and `<stage>/cpu_seconds_<phase>` for every phase."""
        out = {f"{self.stage}/seconds_{p}": s for p, s in self.wall.items()}
        out.update({f"{self.stage}/cpu_seconds_{p}": s for p, s in self.cpu.items()})
        return out
