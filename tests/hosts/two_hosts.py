#!/usr/bin/env python3
"""Two real hosts: network namespaces joined by a veth pair, one semoe-run per host.

  two_hosts.py SEMOE_RUN COLLECTIVES FASHION_MNIST

Each case gets a fresh pair of namespaces (host A 10.77.0.1, host B 10.77.0.2,
one link between them) and runs `semoe-run -n 2 --nnodes 2` in each, 4 ranks in
all, rank 0 on host A:

 1. the flat and hierarchical all-to-all and all-reduce (COLLECTIVES) deliver
    the bytes they must, and the job's digest equals that of 4 ranks on one
    host;
 2. Fashion-MNIST training follows one process's loss curve (1e-4 relative);
 3. packet loss on the link (5 %) slows the job but changes nothing;
 4. the link cut (`ip link set down`) mid-job, and separately 100 % packet
    loss: every rank fails within its timeout (SEMOE_TIMEOUT) and each names a
    peer on the other host.

Packet loss is `tc netem` where the kernel has it, else an nftables rule that
drops packets at random (same effect on TCP). Needs root and network
namespaces; where they cannot be made the test prints why and exits 77
(ctest: skipped).
"""
import os
import re
import secrets
import shutil
import subprocess
import sys
import time

SKIP = 77
HOST_ADDR = ("10.77.0.1", "10.77.0.2")
PORT = 29500
TIMEOUT_S = 5  # SEMOE_TIMEOUT of the failure cases


def run(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def skip(why):
    print(f"SKIPPED: {why}")
    sys.exit(SKIP)


class Hosts:
    """Two network namespaces joined by one veth pair, removed on exit."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"semoe{tag}a", f"semoe{tag}b")
        self.dev = (f"smo{tag}a", f"smo{tag}b")

    def __enter__(self):
        a, b = self.ns
        try:
            run("ip", "netns", "add", a)
            run("ip", "netns", "add", b)
            run("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, addr in zip(self.ns, self.dev, HOST_ADDR):
                run("ip", "link", "set", dev, "netns", ns)
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for ns in self.ns:
            run("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair with it

    def start(self, program, env_extra=None):
        """semoe-run on both hosts; returns the two launcher processes."""
        env = dict(os.environ, SEMOE_SECRET=secrets.token_hex(16), **(env_extra or {}))
        env.pop("SEMOE_WORLD_SIZE", None)
        procs = []
        for node, ns in enumerate(self.ns):
            cmd = ["ip", "netns", "exec", ns, SEMOE_RUN, "-n", "2", "--nnodes", "2", "--node-rank", str(node),
                   "--master", f"{HOST_ADDR[0]}:{PORT}"] + program
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return procs

    def lossy(self, percent):
        """Drop `percent` % of the packets host A sends and receives."""
        ns, dev = self.ns[0], self.dev[0]
        netem = run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "loss",
                    f"{percent}%", check=False) if shutil.which("tc") else None
        if netem and netem.returncode == 0:
            return "tc netem"
        if not shutil.which("nft"):
            raise RuntimeError("neither tc netem (kernel) nor nft (Debian's nftables) is here to drop packets")
        chance = "" if percent >= 100 else f"numgen random mod 100 < {percent} "
        rules = (f"table inet semoe_loss {{\n"
                 f"  chain out {{ type filter hook output priority 0; oifname \"{dev}\" {chance}drop; }}\n"
                 f"  chain in {{ type filter hook input priority 0; iifname \"{dev}\" {chance}drop; }}\n"
                 f"}}\n")
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"nft refused the packet-loss rules: {r.stderr.strip()}\n{rules}")
        return "nftables (this kernel has no netem)"


def finish(procs, limit):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"the job did not end within {limit} s")
        outs.append(out)
    return [p.returncode for p in procs], outs


def one_host(program):
    env = dict(os.environ)
    env.pop("SEMOE_WORLD_SIZE", None)
    r = subprocess.run([SEMOE_RUN] + program, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"one host failed:\n{r.stdout}{r.stderr}"
    return r.stdout


def digest(text):
    m = re.search(r"digest flat (\w+) hierarchical (\w+) ranks (\d+) nodes (\d+)", text)
    assert m, f"no digest line in:\n{text}"
    return m.groups()


def losses(text):
    return [float(m.group(1)) for m in re.finditer(r"^\[0\] step \d+ loss (\S+)", text, re.M)] or \
           [float(m.group(1)) for m in re.finditer(r"^step \d+ loss (\S+)", text, re.M)]


def case(name):
    print(f"--- {name}", flush=True)


def check_collectives():
    case("flat + hierarchical all-to-all and all-reduce: two hosts vs one")
    program = [COLLECTIVES, "--rounds", "8"]
    alone = digest(one_host(["-n", "4"] + program))
    with Hosts() as h:
        t0 = time.monotonic()
        codes, outs = finish(h.start(program), 300)
        assert codes == [0, 0], f"two-host job failed {codes}:\n{outs[0]}{outs[1]}"
    two = digest(outs[0])
    print(f"one host:  flat {alone[0]} hierarchical {alone[1]} ({alone[2]} ranks, {alone[3]} node)")
    print(f"two hosts: flat {two[0]} hierarchical {two[1]} ({two[2]} ranks, {two[3]} nodes), "
          f"{time.monotonic() - t0:.1f} s")
    assert two[3] == "2", "the job did not see two nodes"
    assert two[:2] == alone[:2], "two hosts received other bytes than one host"
    assert two[0] == two[1], "hierarchical differs from flat"


def check_training():
    case("Fashion-MNIST, 50 steps: 2 hosts x 2 ranks vs one process")
    args = [FASHION_MNIST, "--steps", "50", "--limit", "8192", "--batch", "64", "--hidden", "128", "--ffn", "256",
            "--threads", "1", "--print-loss"]
    one = losses(one_host(["-n", "1"] + args))
    with Hosts() as h:
        codes, outs = finish(h.start(args), 600)
        assert codes == [0, 0], f"two-host training failed {codes}:\n{outs[0]}{outs[1]}"
    many = losses(outs[0])
    assert len(one) == 50 and len(many) == 50, f"expected 50 losses, got {len(one)} and {len(many)}"
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, many))
    print(f"loss at step 1 / 50: {many[0]:.6f} / {many[-1]:.6f}; worst relative difference per step {worst:.2e}")
    assert worst <= 1e-4, f"loss curves differ by {worst:.2e} relative"


def check_partial_loss():
    case("5 % packet loss on the link: same bytes, later")
    program = [COLLECTIVES, "--rounds", "8"]
    with Hosts() as h:
        how = h.lossy(5)
        t0 = time.monotonic()
        codes, outs = finish(h.start(program), 300)
        assert codes == [0, 0], f"job under 5 % loss failed {codes}:\n{outs[0]}{outs[1]}"
    print(f"by {how}: digest {digest(outs[0])[0]}, {time.monotonic() - t0:.1f} s")
    assert digest(outs[0])[:2] == digest(one_host(["-n", "4"] + program))[:2]


def check_failure(name, breaker):
    case(name)
    with Hosts() as h:
        procs = h.start([COLLECTIVES, "--rounds", "4", "--seconds", "120"], {"SEMOE_TIMEOUT": str(TIMEOUT_S)})
        # Wait until the job is running its rounds, then break the link.
        seen = ""
        deadline = time.monotonic() + 120
        while "round 50" not in seen:
            line = procs[0].stdout.readline()
            assert line and time.monotonic() < deadline, f"the job did not get going:\n{seen}"
            seen += line
        how = breaker(h)
        t0 = time.monotonic()
        codes, outs = finish(procs, 60)
        took = time.monotonic() - t0
    outs[0] = seen + outs[0]
    text = "".join(outs)
    print(text.rstrip())
    print(f"{how}: both launchers ended {took:.1f} s later with {codes} (SEMOE_TIMEOUT={TIMEOUT_S} s)")
    assert all(c != 0 for c in codes), "a host's job did not fail"
    # Detection within the timeout (plus the tick that notices it), then the
    # launcher's settle time and the SIGTERM grace for anyone still running.
    assert took <= TIMEOUT_S + 1.5 + 3 + 3, f"took {took:.1f} s"
    for rank in range(4):
        other = {2, 3} if rank < 2 else {0, 1}
        errors = [l for l in text.splitlines() if l.startswith(f"[{rank}] collectives:")]
        assert errors, f"rank {rank} printed no error"
        # "waiting on rank 2 (10.77.0.2)" or "waiting on ranks 2 (...), 3 (...)"
        named = {int(r) for l in errors for m in re.finditer(r"waiting on ranks? ([^:]*)", l)
                 for r in re.findall(r"(?:^|, )(\d+)", m.group(1))}
        assert named & other, f"rank {rank} named no peer on the other host:\n" + "\n".join(errors)


def cut(h):
    run("ip", "-n", h.ns[0], "link", "set", h.dev[0], "down")
    return "link cut (ip link set down)"


def black_hole(h):
    return f"100 % packet loss by {h.lossy(100)}"


def main():
    global SEMOE_RUN, COLLECTIVES, FASHION_MNIST
    if len(sys.argv) != 4 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) == 2 else 2
    SEMOE_RUN, COLLECTIVES, FASHION_MNIST = sys.argv[1:]
    if os.geteuid() != 0:
        skip("network namespaces need root (CI runs as root)")
    if not shutil.which("ip"):
        skip("no `ip` command (Debian's iproute2)")
    try:
        with Hosts():
            pass
    except subprocess.CalledProcessError as e:
        skip(f"cannot create network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    cases = {"collectives": check_collectives, "training": check_training, "partial-loss": check_partial_loss,
             "cut": lambda: check_failure("link cut mid-job", cut),
             "black-hole": lambda: check_failure("100 % packet loss mid-job", black_hole)}
    chosen = os.environ.get("SEMOE_TWO_HOSTS_CASES", ",".join(cases)).split(",")  # to rerun one case
    for name in chosen:
        cases[name]()
    print("two hosts: all cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
