"""keep_freed_memory: a step that frees and re-allocates its buffers reuses pages instead of faulting."""

import subprocess
import sys
import textwrap

import pytest

from upcycle.training.memory import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc")

# Three "steps" that each allocate and touch ten 9 MiB buffers (the size of one expert's gradient in
# GPT-2-small) and free them all at once, as zero_grad(set_to_none=True) does. The page faults after the
# first step tell whether freed memory went back to the kernel (glibc's defaults trim the heap after step
# 2 and only adapt their thresholds slowly; measured 23,040 + 2,304 faults default, 2,304 + 0 tuned).
PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from upcycle.training.memory import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        bufs = [torch.ones(9 << 18) for _ in range(10)]
        del bufs
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[1:]))
    """
)


def later_step_faults(mode: str, probe: str = PROBE) -> int:
    out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
    default = later_step_faults("default")
    # The fewest of three: this VM's proactive reclaim (DAMON) can page out idle heap under load and add
    # faults that no allocator setting controls; the claim is that reuse needs none of its own.
    tuned = min(later_step_faults("tuned") for _ in range(3))
    # 90 MiB re-touched is ~23,000 faults of 4 KiB pages.
    assert default > 10_000, default
    assert tuned < default / 4, (tuned, default)


def test_freeing_more_than_two_gib_at_once_keeps_the_memory():
    """glibc's trim threshold is an int: at 2**31 - 1 a step that frees 2.25 GiB at the heap's top would
    still hand it back (and fault it in again next step); -1 turns trimming off."""
    probe = PROBE.replace("range(10)", "range(256)")  # 256 × 9 MiB = 2.25 GiB a step
    tuned = later_step_faults("tuned", probe)
    if tuned >= 10_000:  # a second look only if reclaim under load may have added faults (see above)
        tuned = min(tuned, later_step_faults("tuned", probe))
    assert tuned < 10_000, tuned  # 2.25 GiB of 4 KiB pages is 589,824 faults a step
