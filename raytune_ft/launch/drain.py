"""Drain this Ray node as preempted, then wait out the deadline: a pod's stop turned into Ray's preemption notice.

A Kubernetes eviction or a RunPod stop sends the pod SIGTERM and kills it after a grace period. Ray itself sees
only a node that vanished: the training run fails and restarts from its last periodic checkpoint, counted against
``fault_tolerance.max_failures``. Draining the node first, with reason preemption and the grace period as the
deadline (what Ray's autoscaler does on a cloud's spot notice), gives the run Ray Train's preemption notice
instead: rtf's workers commit a just-in-time checkpoint if it fits before the deadline
(:meth:`raytune_ft.train.callbacks.RtfCallback.check_preemption`), and Ray Train restarts them on other nodes,
counted against ``fault_tolerance.max_preemption_failures`` (default unlimited).

The gap it fills: Ray drains a node when its autoscaler asks; nothing turns a container's SIGTERM into a drain.
Used by the bootstrap (``bootstrap.sh``, ranks > 0, on SIGTERM) and by the worker pods' ``preStop`` hook that
``rtf render k8s`` writes. It uses Ray's own ``ray drain-node`` command; it only finds which node is this one.

    python -m raytune_ft.launch.drain --deadline 60 [--address HOST:PORT] [--temp-dir DIR] [--node-ip IP]
                                      [--no-wait]

Exit codes: 0 drained (and, unless ``--no-wait``, the deadline has passed); 1 the node was not found, the GCS was
unreachable or the drain was refused; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

REASON = "DRAIN_NODE_REASON_PREEMPTION"


def log(msg: str) -> None:
    print(f"[rtf-drain] {msg}", file=sys.stderr, flush=True)


def this_node(address: str, temp_dir: str | None, node_ip: str | None) -> str:
    """The hex id of the alive Ray node this process runs on: the one with this temp dir (when given, and unique
    among the nodes), else the one at this IP (given, or the address Ray picks for this machine). Raises
    ``LookupError`` saying what it saw."""
    from ray._raylet import GcsClient

    nodes = [n for n in GcsClient(address=address).get_all_node_info(timeout=10).values() if n.state == 0]
    found = nodes
    if temp_dir:
        found = [n for n in nodes if os.path.realpath(n.temp_dir) == os.path.realpath(temp_dir)]
    if len(found) != 1:  # no temp dir given, or several nodes share it (every pod's /tmp/ray): the IP decides
        if not node_ip:
            from ray._private.services import get_node_ip_address

            node_ip = get_node_ip_address()
        found = [n for n in found if n.node_manager_address == node_ip]
    if len(found) != 1:
        seen = ", ".join(f"{n.node_manager_address} ({n.temp_dir})" for n in nodes) or "none"
        raise LookupError(f"{len(found)} alive Ray nodes match " + (f"temp dir {temp_dir} and " if temp_dir else "")
                          + f"IP {node_ip}; alive nodes: {seen}")
    return found[0].node_id.hex()


def resolve_address(address: str | None, temp_dir: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS``, else the cluster this node's ``ray start`` recorded."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die("auto", temp_dir=temp_dir)


def drain(address: str, node_id: str, deadline_s: int, message: str) -> None:
    """Ray's ``ray drain-node`` for ``node_id``, reason preemption; raises ``RuntimeError`` when refused."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", address, "--node-id", node_id,
           "--reason", REASON, "--reason-message", message, "--deadline-remaining-seconds", str(deadline_s)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"ray drain-node exited {p.returncode}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raytune_ft.launch.drain", description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=int, required=True, metavar="SECONDS",
                    help="seconds until the node goes (the pod's grace period, less the time Ray needs to stop)")
    ap.add_argument("--address", default=None, help="the GCS, HOST:PORT (default: RAY_ADDRESS, else this node's)")
    ap.add_argument("--temp-dir", default=None, help="this node's Ray temp dir, when several nodes share an IP")
    ap.add_argument("--node-ip", default=None, help="this node's Ray IP (default: the one Ray picks)")
    ap.add_argument("--message", default="pod stop (SIGTERM)", help="the reason message Ray records")
    ap.add_argument("--no-wait", action="store_true", help="return once drained, without waiting out the deadline")
    a = ap.parse_args(argv)
    if a.deadline < 1:
        ap.error("--deadline must be at least 1 second")
    t0 = time.time()
    try:
        address = resolve_address(a.address, a.temp_dir)
        host, _, port = address.rpartition(":")
        try:  # fail in seconds, not after the GCS client's 40 s of retries: the grace period is short
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        except (OSError, ValueError) as e:
            raise ConnectionError(f"the Ray GCS at {address} is not reachable ({e})") from None
        node = this_node(address, a.temp_dir, a.node_ip)
        drain(address, node, a.deadline, a.message)
    except (LookupError, RuntimeError, ConnectionError, OSError, subprocess.TimeoutExpired) as e:
        log(f"could not drain this node: {e}")
        return 1
    except Exception as e:  # Ray's own errors (a refused token, an unreachable GCS) have no common base here
        log(f"could not drain this node: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1
    log(f"drained node {node[:12]} (reason preemption, deadline in {a.deadline}s): a training run on it commits "
        "a checkpoint if one fits, and Ray Train restarts its workers elsewhere when the deadline passes")
    if not a.no_wait:
        time.sleep(max(0.0, a.deadline - (time.time() - t0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
