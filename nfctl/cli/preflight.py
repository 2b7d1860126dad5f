"""`nfctl doctor --preflight`: the agent pod's init container. A node that cannot run NFs
(no kernel headers, no bpffs, missing capabilities...) gets an Event on the pod saying why,
and the pod waits in its init phase, checking again, instead of crash-looping."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from nfctl.cli.output import console

log = logging.getLogger(__name__)


def run_preflight(
    recheck: float, kube_api: str | None, token_file: Path | None, ca_file: Path | None
) -> int:
    from nfctl import doctor as doc
    from nfctl.agent.k8s_node import KubeApi, KubeApiError

    reported = ""
    while True:
        checks = doc.run_checks()
        failures = doc.blocking_failures(checks)
        for check in checks:
            mark = "ok  " if check.ok else "FAIL"
            console.print(f"{mark} {check.name}: {check.message}", markup=False, highlight=False)
        if not failures:
            console.print("preflight passed: this node can run NFs")
            return 0
        message = doc.cannot_run_message(failures)
        if message != reported:  # one Event per distinct reason, not one per recheck
            pod, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
            if pod and namespace:
                try:
                    api = KubeApi.in_cluster(kube_api)
                    api = KubeApi(api.url, token_file or api.token_file, ca_file or api.ca_file)
                    event = doc.pod_event(
                        pod,
                        namespace,
                        os.environ.get("POD_UID", ""),
                        os.environ.get("NODE_NAME", ""),
                        message,
                    )
                    api.open("POST", f"/api/v1/namespaces/{namespace}/events", 30, event).close()
                    reported = message
                except (KubeApiError, OSError, ValueError) as exc:
                    log.warning("cannot post the preflight Event: %s", exc)
            else:
                log.warning("POD_NAME/POD_NAMESPACE not set: no Event posted")
        console.print(f"{message}; checking again in {recheck:.0f}s", markup=False)
        time.sleep(recheck)
