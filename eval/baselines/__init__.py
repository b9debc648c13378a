"""Training-free baselines beside the bootstrapped students, on the same teacher.

`tome`: Token Merging (Bolya et al., ICLR 2023) applied to a teacher (`ToMe(teacher, r)`).
"""

from .tome import ToMe, ToMeError, max_r, schedule

__all__ = ["ToMe", "ToMeError", "max_r", "schedule"]
