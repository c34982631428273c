"""All of edgeq on one machine, no work pool or worker: `python deployments/serve.py` (from the repo root).

Serves the deployments of deployments/prefect.yaml (same names, parameters, schedule, concurrency limits and
calibration-approval trigger) from this one process with `prefect.serve`; as there, each deployment is named after
its flow (`convert-model/convert-model`, `build-calibration-set/build-calibration-set`,
`retrain-to-deploy/retrain-to-deploy`). Point it at a running server
(`prefect server start`, PREFECT_API_URL); with no server, Prefect's ephemeral one runs no schedules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFECT_YAML = Path(__file__).resolve().parent / "prefect.yaml"


def runner_deployments(prefect_yaml: Path = PREFECT_YAML) -> list[Any]:
    """The `deployments:` of prefect.yaml as RunnerDeployments for `prefect.serve`."""
    import yaml
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval, RRule

    spec = yaml.safe_load(prefect_yaml.read_text())
    out = []
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        schedules = []
        for s in d.get("schedules") or []:
            common = {k: s[k] for k in ("timezone", "active", "parameters", "slug") if k in s}
            if "cron" in s:
                schedules.append(Cron(s["cron"], **common))
            elif "interval" in s:
                schedules.append(Interval(s["interval"], **common))
            else:
                schedules.append(RRule(s["rrule"], **common))
        limit = d.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = ConcurrencyLimitConfig(**{k: v for k, v in limit.items() if v is not None})
        triggers = [DeploymentEventTrigger(**t) for t in d.get("triggers") or [] if t.get("type", "event") == "event"]
        out.append(flow.to_deployment(name=d["name"], description=d.get("description"), tags=d.get("tags"),
                                      parameters=d.get("parameters"), schedules=schedules or None,
                                      concurrency_limit=limit, triggers=triggers or None))
    return out


def main() -> None:
    from edgeq.core.quiet import quiet_environment

    quiet_environment()
    from prefect import serve

    serve(*runner_deployments())


if __name__ == "__main__":
    main()
