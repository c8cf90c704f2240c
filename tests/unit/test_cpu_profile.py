"""bench/cpu_profile.py: samples go to the component whose code they are in; waits are left out."""

from __future__ import annotations

from bench.cpu_profile import OTHER, OrchestratorProfile, component, shares

ROUTE = 'process 1:"gpumarket orchestrator serve";run (uvicorn/main.py:1)'


def test_each_sample_goes_to_its_component_and_waits_are_not_cpu() -> None:
    submit = [ROUTE, "submit_batch (orchestrator/api/routes/jobs.py:70)", "execute (x.py:1)"]
    dispatch = [*submit[:2], "LeaseService.dispatch (orchestrator/services/leases.py:1)"]
    claim = ["WorkerThread.run (anyio/x.py:1)", "LeaseService.claim (orchestrator/x.py:3)"]
    waiting = [*submit[:2], "Condition.wait (threading.py:327)"]
    assert component(submit) == "submit"
    assert component(dispatch) == "dispatch"  # inside a submit, still its own component
    assert component(claim) == "lease"
    assert component(waiting) is None
    assert component(["main (x.py:1)"]) == OTHER
    raw = "\n".join(
        f"{';'.join(stack)} {n}" for stack, n in ((submit, 3), (dispatch, 1), (waiting, 50))
    )
    counts = shares(raw + "\nnot a sample line")
    assert counts == {"submit": 3, "dispatch": 1}

    profile = OrchestratorProfile(pid=1)
    profile.counts = counts
    # 8 ms of CPU for 2 jobs: 4 ms each, split 3:1
    assert profile.per_job_ms(0.008, 2) == {"submit": 3.0, "dispatch": 1.0}
    assert (
        profile.describe(0.008, 2) == "orchestrator CPU per job 4.00 ms: submit 3.00, dispatch 1.00"
    )
    profile.counts.clear()
    profile.problem = "no CPU breakdown: py-spy is not installed"
    assert profile.describe(0.008, 2).endswith("(no CPU breakdown: py-spy is not installed)")
