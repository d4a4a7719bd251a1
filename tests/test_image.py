"""The image as the DaemonSet runs it: built by scripts/image.sh (cached by the hash of
its inputs), its root filesystem read-only under chroot, exactly the manifest's host
mounts, environment, user, capabilities (bounding set) and no_new_privs, in a lab node.

No container runtime runs here; what a runtime does for these containers is done by
hand the way runc does it: a private mount namespace, the rootfs bound read-only, proc
and a sysfs of the pod's network namespace, each volume mounted where the manifest says,
then the user and the capability bounding set applied and no_new_privs set, and last the
runtime's default seccomp filter (tests/seccomp_profile.py: a real profile resolved for the
container's bounding set and compiled by libseccomp) before the entrypoint is executed.
Not modelled: runc's stub answering ENOSYS for syscalls newer than the profile knows.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import kubelet
import pytest
import seccomp_profile
from conftest import filters, netlab, wait_for
from fakeapi import FakeApiServer
from test_daemonset import by_kind, render

ROOT = Path(__file__).resolve().parents[1]
CNIFLOW = Path(sys.executable).with_name("cniflow")
_ids = itertools.count()


@pytest.fixture(scope="module")
def rootfs() -> Path:
    """The built image's root filesystem (built once per change of its inputs)."""
    out = subprocess.run([str(ROOT / "scripts/image.sh"), "--print-rootfs"],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip())


@pytest.fixture
def lab():
    prefix = f"img{os.getpid() % 1000}{next(_ids)}"
    node = netlab.up(prefix, 2)
    try:
        yield node
    finally:
        netlab.down(prefix)


@functools.cache
def rendered(path: str = "daemonset") -> dict:
    """The pod template and agent settings of a kustomization (the base or an overlay)."""
    objects = render(ROOT / path)
    spec = by_kind(objects, "DaemonSet")[0]["spec"]["template"]["spec"]
    config = next(c for c in by_kind(objects, "ConfigMap")
                  if c["metadata"]["name"].startswith("cniflow-config"))["data"]
    return {"spec": spec, "config": config}


@pytest.fixture(scope="module")
def pod() -> dict:
    return rendered()


@functools.cache
def profiles() -> dict[str, dict]:
    """RuntimeDefault as runtimes generate it. older: containers-common's profile as
    installed here (Debian 12's 0.50.1; CRI-O, podman, buildah), which allows bpf and
    perf_event_open only with CAP_SYS_ADMIN, as containerd before 1.7 and Docker before
    23.0 did. newer: the same with bpf allowed by CAP_BPF and perf_event_open by
    CAP_PERFMON, the change containerd#7301 (1.7.0, backported to 1.6 in #7574), moby#43987
    (23.0) and container-libs' seccomp.json made."""
    older = json.loads(Path(seccomp_profile.COMMON).read_text())
    return {"older": older, "newer": seccomp_profile.newer(older)}


def container(pod: dict, name: str) -> dict:
    spec = pod["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", [])
                if c["name"] == name)


def run(rootfs: Path, pod: dict, name: str, netns: str, env: dict[str, str],
        host: dict[str, str], log: Path, drop: str = "",
        profile: dict | None = None) -> subprocess.Popen:
    """Start one container of the pod as a runtime would. host: hostPath overrides (the
    test's own directories); drop: a capability the manifest grants, taken away;
    profile: the runtime's default seccomp profile, applied where the container asks
    for RuntimeDefault."""
    c = container(pod, name)
    sc = c["securityContext"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    r = f"/tmp/{netns}-{name}-root"
    steps = [f"mkdir -p {r}", f"mount --bind {rootfs} {r}"]
    for m in c.get("volumeMounts", []):
        (rootfs / m["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)  # as runc
    if sc.get("readOnlyRootFilesystem"):
        steps.append(f"mount -o remount,bind,ro {r}")
    steps += [f"mount -t proc proc {r}/proc", f"mount -t sysfs -o ro sysfs {r}/sys"]
    for m in c.get("volumeMounts", []):
        v, target = volumes[m["name"]], r + m["mountPath"]
        if "emptyDir" in v:
            steps.append(f"mount -t tmpfs tmpfs {target}")
            continue
        src = host.get(v["hostPath"]["path"], v["hostPath"]["path"])
        if v["hostPath"].get("type") == "DirectoryOrCreate":
            os.makedirs(src, exist_ok=True)
        steps.append(f"mount --rbind {src} {target}")  # as runc: recursive (/run/netns)
        if m.get("readOnly"):
            steps.append(f"mount -o remount,bind,ro {target}")
    caps = [x.lower() for x in sc["capabilities"].get("add", []) if x != drop]
    assert sc["capabilities"]["drop"] == ["ALL"]
    priv = ["setpriv", f"--reuid={sc['runAsUser']}", f"--regid={sc.get('runAsGroup', 0)}",
            "--clear-groups", "--inh-caps=-all",
            "--bounding-set=" + ",".join(["-all"] + [f"+{x}" for x in caps])]
    if sc.get("allowPrivilegeEscalation") is False:
        priv.append("--no-new-privs")
    base = {"PATH": "/opt/cniflow/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "BCC_KERNEL_SOURCE": "/usr/lib/cniflow/kernel", "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/"}  # the image's ENV (and a runtime's HOME)
    full = {**base, **env, **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}
    # the environment first: anything exec'd between setpriv and the entrypoint would
    # drop the permitted set (as runc, setpriv executes the entrypoint itself)
    argv = ["env", "-i", *[f"{k}={v}" for k, v in full.items()], *priv, *c["command"]]
    redirect = ""
    if profile is not None and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault":
        bpf = log.with_suffix(".seccomp")  # the filter, for exactly this bounding set
        seccomp_profile.compile_filter(seccomp_profile.resolve(
            profile, {f"CAP_{x.upper()}" for x in caps}), str(bpf))
        at = len(argv) - len(c["command"])  # setpriv execs the installer, which execs it
        argv[at:at] = ["/opt/cniflow/bin/python3", "-c", seccomp_profile.INSTALL]
        redirect = f" 3<{shlex.quote(str(bpf))}"
    steps.append(f"exec chroot {r} " + shlex.join(argv) + redirect)
    with log.open("w") as f:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "nsenter",
             f"--net=/run/netns/{netns}", "sh", "-ec", "\n".join(steps)],
            stdout=f, stderr=subprocess.STDOUT)


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status of a container's process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.mark.parametrize("runtime,manifest", [
    ("newer", "daemonset"), ("older", "daemonset/overlays/legacy-seccomp"),
    ("newer", "daemonset/overlays/pod-side")])
def test_the_image_meters_a_pod_as_the_daemonset_runs_it(rootfs, lab, tmp_path, runtime,
                                                         manifest):
    """Agent and collector from the image, non-root, with the manifest's capabilities only,
    under the runtime's default seccomp profile (newer runtimes: the base as shipped; older
    ones: the legacy-seccomp overlay, the agent unconfined) and no kernel headers from the
    node: a pod's pings reach the collector's file exact. The pod-side overlay: with
    CAP_SYS_ADMIN the agent enters the pods' namespaces and meters their ends too, and
    the pings are still counted once."""
    pod, profile = rendered(manifest), profiles()[runtime]
    release = os.uname().release
    assert not (rootfs / "lib/modules" / release / "build").exists()
    assert "/lib/modules" not in {m["mountPath"] for m in container(pod, "agent")["volumeMounts"]}
    web, db = lab.pods
    api = FakeApiServer(lab.netns)
    api.namespace("shop", {"cniflow.io/export": "true"})
    api.pod("shop", "web", "node-a", [web.ipv4])
    api.pod("shop", "db", "node-a", [db.ipv4])
    records = tmp_path / "records"
    records.mkdir()
    os.chmod(tmp_path, 0o755)
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")  # stands in for the service account
    os.chmod(kubeconfig, 0o644)
    bpffs = tmp_path / "bpffs"  # the node's bpffs as systemd mounts it (0700), the test's own
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=700", "bpf", str(bpffs)], check=True)
    host = {"/var/log/cniflow": str(records), "/sys/fs/bpf": str(bpffs)}
    init = run(rootfs, pod, "owner", lab.netns, pod["config"], host, tmp_path / "init.log",
               profile=profile)
    assert init.wait(30) == 0, (tmp_path / "init.log").read_text()
    assert records.stat().st_uid == 65532 and (bpffs / "cniflow").stat().st_uid == 65532
    collector = run(rootfs, pod, "collector", lab.netns, {}, host, tmp_path / "collector.log",
                    profile=profile)
    # the service account's place: a kubeconfig bound where the runtime puts the token
    sa = rootfs / "run/secrets/kubernetes.io/serviceaccount"
    sa.mkdir(parents=True, exist_ok=True)
    env = {**pod["config"], "NODE_NAME": "node-a",
           "KUBECONFIG": "/run/secrets/kubernetes.io/serviceaccount/kubeconfig",
           "CNIFLOW_IDLE_TIMEOUT": "2"}
    agent_pod = json.loads(json.dumps(pod))
    container(agent_pod, "agent")["volumeMounts"].append(
        {"name": "sa", "mountPath": "/run/secrets/kubernetes.io/serviceaccount",
         "readOnly": True})
    agent_pod["spec"]["volumes"].append({"name": "sa", "hostPath": {"path": str(tmp_path)}})
    agent = run(rootfs, agent_pod, "agent", lab.netns, env, host, tmp_path / "agent.log",
                profile=profile)
    log = tmp_path / "agent.log"
    try:
        assert wait_for(lambda: "cniflow_ingress" in filters(lab, web.host_if), 90), \
            log.read_text()
        st = status(agent.pid)  # every step exec'd the next: one pid
        assert st["Uid"].split()[0] == "65532" and st["NoNewPrivs"] == "1"
        pod_side = manifest.endswith("pod-side")
        want = (1 << 12) | (1 << 38) | (1 << 39) | (pod_side << 21)  # NET_ADMIN, PERFMON,
        # BPF, SYS_ADMIN where the manifest adds it
        assert int(st["CapEff"], 16) == want and int(st["CapBnd"], 16) == want
        # filtered where the manifest asks for RuntimeDefault, and only there
        assert st["Seccomp"] == ("2" if runtime == "newer" else "0")
        col = status(collector.pid)
        assert col["Seccomp"] == "2" and col["Seccomp_filters"] == "1"
        assert col["Uid"].split()[0] == "65532" and int(col["CapEff"], 16) == 0
        assert int(col["CapPrm"], 16) == 0
        subprocess.run(lab.in_pod(0, f"ping -c 5 -i 0.2 -q {db.ipv4}").split(),
                       stdout=subprocess.DEVNULL, check=True)
        # from the node (kubelet's probes' way): at db's host side, or its own end
        subprocess.run(lab.exec(f"ping -c 3 -i 0.2 -q {db.ipv4}").split(),
                       stdout=subprocess.DEVNULL, check=True)
        out = records / "records.jsonl"

        def echo() -> list[dict]:
            rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
            return [r for r in rows if r.get("icmpTypeCodeIPv4") == 0x0800
                    and r.get("interfaceName") == web.host_if]

        assert wait_for(lambda: echo(), 20), log.read_text()

        def probes() -> list[dict]:
            rows = [json.loads(x) for x in out.read_text().splitlines()]
            return [r for r in rows if r.get("icmpTypeCodeIPv4") == 0x0800
                    and r.get("destinationIPv4Address") == db.ipv4
                    and r.get("sourcePodName", "") == ""]

        assert wait_for(lambda: sum(r["packetDeltaCount"] for r in probes()) >= 3, 20)
        metrics = subprocess.run(lab.exec("curl -s 127.0.0.1:9477/metrics").split(),
                                 capture_output=True, text=True).stdout
        assert f"cniflow_netns_lookup_enabled {float(pod_side)}" in metrics
        assert f"cniflow_pod_ends {2.0 * pod_side}" in metrics
        # the collector raised NET_ADMIN (the manifest's) to size its buffer past
        # net.core.rmem_max, then gave it up (CapPrm 0 above, read after it listened)
        metrics = subprocess.run(lab.exec("curl -s 127.0.0.1:9478/metrics").split(),
                                 capture_output=True, text=True).stdout
        (size,) = [float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("cniflow_collector_receive_buffer_bytes ")]
        assert size == 8 << 20
    finally:
        codes = kubelet.stop(pod["spec"], {"agent": agent, "collector": collector})
        api.stop()
        subprocess.run(["umount", "-l", str(bpffs)])
    assert codes == {"agent": 0, "collector": 0}, log.read_text()
    assert ("no CAP_SYS_ADMIN" in log.read_text()) != pod_side
    assert [(r["sourcePodName"], r["destinationPodName"], r["packetDeltaCount"],
             r["octetDeltaCount"]) for r in echo()] == [("web", "db", 5, 5 * 84)]
    assert [(r["interfaceName"], r["flowDirection"], r["destinationPodName"],
             r["packetDeltaCount"]) for r in probes()] == [(db.host_if, 1, "db", 3)]


@pytest.mark.parametrize("cap", ["BPF", "NET_ADMIN", "PERFMON"])
def test_a_capability_taken_away_is_named(rootfs, lab, pod, tmp_path, cap):
    env = {**pod["config"], "CNIFLOW_KUBERNETES": "false", "CNIFLOW_PIN_PATH": "off",
           "CNIFLOW_INTERFACE": lab.pods[0].host_if}
    log = tmp_path / "agent.log"
    proc = run(rootfs, pod, "agent", lab.netns, env, {}, log, drop=cap,
               profile=profiles()["newer"])  # the filter resolved without it, too
    assert proc.wait(60) == 2, log.read_text()
    err = log.read_text()
    assert f"missing capability CAP_{cap}" in err, err
    assert "Traceback" not in err and "cniflow_ingress" not in filters(lab, lab.pods[0].host_if)


def test_an_older_runtimes_profile_is_named_with_what_to_do(rootfs, lab, pod, tmp_path):
    """The base as shipped on a runtime whose RuntimeDefault allows bpf() only with
    CAP_SYS_ADMIN: exit 2, one line naming the cause and the remedy, nothing attached."""
    env = {**pod["config"], "CNIFLOW_KUBERNETES": "false", "CNIFLOW_PIN_PATH": "off",
           "CNIFLOW_INTERFACE": lab.pods[0].host_if}
    log = tmp_path / "agent.log"
    proc = run(rootfs, pod, "agent", lab.netns, env, {}, log, profile=profiles()["older"])
    assert proc.wait(60) == 2, log.read_text()
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    assert "bpf() refused (EPERM) with CAP_BPF held" in lines[0]
    assert "allows bpf() only with CAP_SYS_ADMIN" in lines[0]
    assert "daemonset/overlays/legacy-seccomp" in lines[0]
    assert "cniflow_ingress" not in filters(lab, lab.pods[0].host_if)


PROBE = """
import ctypes, errno, os, platform
nr = {"x86_64": (321, 298, 300), "aarch64": (280, 241, 262)}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
args = ((0x7FFF, 0, 0), (0, 0, -1, -1, 0), (-1, 0))  # each fails in the kernel if let in
print(*[errno.errorcode[ctypes.get_errno()] if libc.syscall(n, *a) == -1 else "ok"
        for n, a in zip(nr, args)])
"""


@pytest.mark.parametrize("runtime,caps,want", [
    ("older", {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"}, "EPERM EPERM EPERM"),
    ("older", {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"},
     "EINVAL EFAULT EINVAL"),
    ("newer", {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"}, "EINVAL EFAULT EPERM"),
    ("newer", {"CAP_BPF"}, "EINVAL EPERM EPERM"),
    ("newer", set(), "EPERM EPERM EPERM"),  # the collector
])
def test_the_filter_answers_bpf_perf_event_open_fanotify_init_as_the_profile_says(
        tmp_path, runtime, caps, want):
    """bpf, perf_event_open, fanotify_init (CAP_SYS_ADMIN's alone) through the compiled
    filter: the kernel answers what the filter lets in (EINVAL, EFAULT, EINVAL: bad
    arguments), the filter refuses with EPERM."""
    bpf = tmp_path / "filter"
    seccomp_profile.compile_filter(seccomp_profile.resolve(profiles()[runtime], caps), str(bpf))
    with bpf.open("rb") as f:
        out = subprocess.run([sys.executable, "-c", seccomp_profile.INSTALL, sys.executable,
                              "-c", PROBE], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, pass_fds=(3,),
                             preexec_fn=lambda: os.dup2(f.fileno(), 3))  # fd 3, as run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == want.split()


def test_no_kernel_headers_on_the_node(rootfs, lab, tmp_path):
    """The host's agent in a mount namespace where /lib/modules and /usr/src are empty:
    without BCC_KERNEL_SOURCE a clear error; pointed at the image's headers, it meters."""
    web, db = lab.pods
    hide = "mount -t tmpfs tmpfs /lib/modules; mount -t tmpfs tmpfs /usr/src; "
    cmd = (f"{CNIFLOW} agent --interface {web.host_if} --collector 127.0.0.1:4739 "
           "--metrics-address 127.0.0.1:9477 --poll-interval 0.5 --pin-path off")
    env = {k: v for k, v in os.environ.items() if k != "BCC_KERNEL_SOURCE"}

    def start(extra: dict[str, str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
             hide + f"test ! -e /lib/modules/{os.uname().release}/build; exec " +
             lab.exec(cmd)], env={**env, **extra}, stdout=log.open("w"),
            stderr=subprocess.STDOUT)

    bare = start({}, tmp_path / "bare.log")
    assert bare.wait(60) == 2
    err = (tmp_path / "bare.log").read_text()
    assert "no kernel headers" in err and "BCC_KERNEL_SOURCE" in err, err
    from test_collector import RunningCollector

    collector = RunningCollector(lab.netns, 4739)
    agent = start({"BCC_KERNEL_SOURCE": str(rootfs / "usr/lib/cniflow/kernel")},
                  tmp_path / "agent.log")
    try:
        assert wait_for(lambda: "cniflow_ingress" in filters(lab, web.host_if), 60), \
            (tmp_path / "agent.log").read_text()
        subprocess.run(lab.in_pod(0, f"ping -c 3 -i 0.2 -q {db.ipv4}").split(),
                       stdout=subprocess.DEVNULL, check=True)
        time.sleep(1)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, (tmp_path / "agent.log").read_text()
    rows = collector.stop()
    echo = [r for r in rows if r.get("icmpTypeCodeIPv4") == 0x0800]
    assert [(r["packetDeltaCount"], r["octetDeltaCount"]) for r in echo] == [(3, 3 * 84)]
