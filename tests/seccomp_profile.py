"""A container runtime's RuntimeDefault seccomp filter, for the image tests.

A profile in the OCI/docker format (containers-common's /usr/share/containers/seccomp.json,
which podman, buildah and CRI-O use) is resolved for the container's bounding set the way
containers/common and moby resolve it (pkg/seccomp: "includes"/"excludes" by caps, arches
and minKernel), then compiled with libseccomp the way runc does (each name a rule, arguments
as conditions, a rule whose action is the default skipped, names unknown to libseccomp
skipped) into the classic BPF program the kernel receives. INSTALL is what runs it: the
image's own interpreter, exec'd by setpriv after no_new_privs, loads the program from fd 3
and execs the entrypoint, so the filter is the last thing set before the entrypoint (as
runc sets it) and the interpreter's file capabilities carry through both execs.
"""

from __future__ import annotations

import copy
import os
import platform

import seccomp as lib

COMMON = "/usr/share/containers/seccomp.json"
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
_NATIVE = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}[_GOARCH]
_OPS = {"SCMP_CMP_NE": lib.NE, "SCMP_CMP_LT": lib.LT, "SCMP_CMP_LE": lib.LE,
        "SCMP_CMP_EQ": lib.EQ, "SCMP_CMP_GE": lib.GE, "SCMP_CMP_GT": lib.GT,
        "SCMP_CMP_MASKED_EQ": lib.MASKED_EQ}
# the image's interpreter: read the program from fd 3, load it, exec the entrypoint
INSTALL = (
    "import ctypes as c, os, sys\n"
    "b = os.read(3, 1 << 20); os.close(3)\n"
    "class P(c.Structure): _fields_ = [('n', c.c_ushort), ('f', c.c_char_p)]\n"
    "libc = c.CDLL(None, use_errno=True)\n"
    "if libc.prctl(22, 2, c.byref(P(len(b) // 8, b)), 0, 0):\n"  # PR_SET_SECCOMP, FILTER
    "    sys.exit('seccomp: ' + os.strerror(c.get_errno()))\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n")


def _kernel() -> tuple[int, ...]:
    return tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])


def resolve(profile: dict, caps: set[str]) -> dict:
    """The OCI linux.seccomp a runtime writes for a container with this bounding set."""
    out = {"defaultAction": profile["defaultAction"], "architectures": [], "syscalls": []}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    for a in profile.get("archMap", []):
        if a["architecture"] == _NATIVE:
            out["architectures"] = [a["architecture"], *a.get("subArchitectures", [])]
    for call in profile["syscalls"]:
        inc, exc = call.get("includes") or {}, call.get("excludes") or {}
        if inc.get("arches") and _GOARCH not in inc["arches"]:
            continue
        if _GOARCH in exc.get("arches", []):
            continue
        if any(c not in caps for c in inc.get("caps", [])):
            continue  # every included cap is needed
        if any(c in caps for c in exc.get("caps", [])):
            continue  # any excluded cap drops the rule
        if inc.get("minKernel") and _kernel() < tuple(
                int(x) for x in inc["minKernel"].split(".")[:2]):
            continue
        out["syscalls"].append({k: v for k, v in call.items()
                                if k not in ("includes", "excludes", "comment")})
    return out


def _action(action: str, errno_ret: int | None):
    if action == "SCMP_ACT_ALLOW":
        return lib.ALLOW
    if action == "SCMP_ACT_ERRNO":
        return lib.ERRNO(1 if errno_ret is None else errno_ret)  # runc: EPERM by default
    raise ValueError(f"action {action} not modelled")


def compile_filter(spec: dict, path: str) -> None:
    """Write the classic BPF program libseccomp builds from an OCI linux.seccomp, as for runc."""
    default = (spec["defaultAction"], spec.get("defaultErrnoRet"))
    f = lib.SyscallFilter(_action(*default))
    f.set_attr(lib.Attr.CTL_NNP, 0)  # runc sets no_new_privs itself
    for arch in spec["architectures"][1:]:
        f.add_arch(lib.Arch(arch.removeprefix("SCMP_ARCH_").lower()))
    for call in spec["syscalls"]:
        key = (call["action"], call.get("errnoRet"))
        if key == default:
            continue  # runc skips a rule that repeats the default
        action = _action(*key)
        args = [lib.Arg(a["index"], _OPS[a["op"]], a["value"], a.get("valueTwo", 0))
                for a in call.get("args") or []]
        # runc: conditions on distinct arguments are ANDed in one rule; two on the same
        # argument make one rule each (libseccomp cannot AND them)
        same = len({a["index"] for a in call.get("args") or []}) < len(args)
        for name in call["names"]:
            try:
                lib.resolve_syscall(lib.Arch.NATIVE, name)
            except (ValueError, RuntimeError):
                continue  # unknown to this libseccomp: runc ignores it
            for group in ([[a] for a in args] if same else [args]):
                f.add_rule(action, name, *group)
    with open(path, "wb") as out:
        f.export_bpf(out)


def newer(profile: dict) -> dict:
    """containers-common's profile with the change the newer runtimes made (moby#43987,
    containerd#7301, container-libs' seccomp.json): bpf allowed by CAP_BPF and
    perf_event_open by CAP_PERFMON, each still EPERM when neither it nor CAP_SYS_ADMIN
    is held."""
    p = copy.deepcopy(profile)
    for call in p["syscalls"]:
        if call["action"] == "SCMP_ACT_ERRNO" and \
                (call.get("excludes") or {}).get("caps") == ["CAP_SYS_ADMIN"]:
            call["names"] = [n for n in call["names"] if n not in ("bpf", "perf_event_open")]
    for name, cap in (("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")):
        p["syscalls"] += [
            {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "excludes": {"caps": ["CAP_SYS_ADMIN", cap]}},
            {"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}}]
    return p
