#!/usr/bin/env python3
"""The comparison suite behind `bench/run`: each workload on native disk,
intermezzo and each peer that supports it (sshfs, rsync, unison, syncthing);
prints one table (median of the runs, ratio to native) and the targets.

Python 3 standard library only. Run through `bench/run` (which installs the
peers, builds izo and makes the bench file system); workloads and how to
read the table: BENCHMARKS.md, section "The suite".
"""
import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess as sp
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IZO = os.path.join(REPO, "target", "release", "izo")
SYSTEMS = ["native", "intermezzo", "sshfs", "rsync", "unison", "syncthing"]


class Timeout(Exception):
    pass


class Interrupted(BaseException):
    pass


def now():
    return time.perf_counter()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- results

class Row:
    def __init__(self, key, label, unit, better="low", native=True):
        self.key, self.label, self.unit, self.better, self.native = key, label, unit, better, native


class Results:
    def __init__(self):
        self.vals = {}  # (row, system) -> [float]
        self.fails = {}  # (row, system) -> [str]
        self.notes = []

    def add(self, row, system, v):
        self.vals.setdefault((row, system), []).append(float(v))

    def fail(self, row, system, why):
        self.fails.setdefault((row, system), []).append(why)

    def note(self, msg):
        log("note: " + msg)
        self.notes.append(msg)

    def median(self, row, system):
        v = self.vals.get((row, system))
        return statistics.median(v) if v else None


R = Results()


def fmt_num(x):
    if x is None:
        return "?"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


# ---------------------------------------------------------------- processes, mounts, cleanup

class Ctx:
    def __init__(self, base):
        self.base = base
        self.procs = []  # [name, Popen, stopper]
        self.mounts = []  # mount points we made
        self.lock = threading.Lock()

    def spawn(self, name, cmd, stopper=None, **kw):
        kw.setdefault("stdin", sp.DEVNULL)
        p = sp.Popen(cmd, start_new_session=True, **kw)
        self.procs.append([name, p, stopper])
        return p

    def forget(self, p):
        self.procs = [x for x in self.procs if x[1] is not p]

    def cleanup(self):
        for name, p, stopper in reversed(list(self.procs)):
            if p.poll() is None:
                log(f"cleanup: stopping {name} (pid {p.pid})")
                try:
                    if stopper:
                        stopper()
                    else:
                        stop_proc(p, 10)
                except BaseException as e:  # noqa: BLE001 - best effort on the way out
                    log(f"cleanup: {name}: {e}")
                    kill_group(p, signal.SIGKILL)
        self.procs = []
        for m in reversed(self.mounts):
            if is_mounted(m):
                log(f"cleanup: lazy unmount of {m}")
                umount_lazy(m)
        self.mounts = []


CTX = None


def kill_group(p, sig):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_proc(p, wait, sig=signal.SIGTERM):
    """SIGTERM the process (its own session), then SIGKILL its group."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
        except sp.TimeoutExpired:
            kill_group(p, signal.SIGKILL)
            try:
                p.wait(10)
            except sp.TimeoutExpired:
                log(f"pid {p.pid} does not die (stuck in a file system?)")
    kill_group(p, signal.SIGKILL)  # stragglers of its session


def mountinfo():
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            out.append((parts[4].replace("\\040", " "), parts[2], line.split(" - ")[1].split()[0]))
    return out


def is_mounted(path):
    return any(mp == path for mp, _, _ in mountinfo())


def fuse_abort(path):
    """Abort the FUSE connection of the mount at path (never stats it)."""
    for mp, dev, fstype in mountinfo():
        if mp == path and fstype.startswith("fuse"):
            conn = "/sys/fs/fuse/connections"
            if not os.path.exists(os.path.join(conn, dev.split(":")[1])):
                sp.run(["mount", "-t", "fusectl", "none", conn], stderr=sp.DEVNULL)
            try:
                with open(os.path.join(conn, dev.split(":")[1], "abort"), "w") as f:
                    f.write("1")
                log(f"aborted the FUSE connection of {path}")
            except OSError as e:
                log(f"could not abort {path}: {e}")


def umount_lazy(path):
    sp.run(["umount", "-l", path], stderr=sp.DEVNULL, timeout=30)


def abort_our_fuse_mounts():
    for m in CTX.mounts:
        if is_mounted(m):
            fuse_abort(m)


def sh(cmd, timeout, stdout=sp.PIPE, check=True, env=None, cwd=None, full=False):
    """Run cmd in its own session; on timeout kill the whole group (and
    abort our FUSE mounts if it will not die) and raise Timeout."""
    p = CTX.spawn(cmd[0], cmd, stdout=stdout, stderr=sp.PIPE, env=env, cwd=cwd)
    try:
        out, err = p.communicate(timeout=timeout)
    except sp.TimeoutExpired:
        kill_group(p, signal.SIGKILL)
        try:
            p.communicate(timeout=10)
        except sp.TimeoutExpired:
            abort_our_fuse_mounts()
            p.communicate(timeout=30)
        raise Timeout(f"{' '.join(cmd[:3])}... > {timeout:.0f} s")
    finally:
        CTX.forget(p)
    if check and p.returncode != 0:
        tail = (err or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {p.returncode}: {' | '.join(tail)}")
    out = out.decode(errors="replace") if isinstance(out, bytes) else out
    if full:
        return p.returncode, out, (err or b"").decode(errors="replace")
    return out


def tree_pids(pid):
    out = [pid]
    for p in out:
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def sh_rusage(cmd, timeout, env=None):
    """Like sh, but returns (seconds, peak RSS in KiB): the sum over the
    command's processes of each one's VmHWM, sampled every 10 ms (wait4's
    ru_maxrss would include this Python process, which it forked from)."""
    errf = open(os.path.join(CTX.base, f".stderr.{os.getpid()}"), "w+")
    p = CTX.spawn(cmd[0], cmd, stdout=sp.DEVNULL, stderr=errf, env=env)
    t0 = now()
    deadline = t0 + timeout
    hwm = {}
    try:
        while True:
            pid, status, _ = os.wait4(p.pid, os.WNOHANG)
            if pid:
                el = now() - t0
                p.returncode = os.waitstatus_to_exitcode(status)
                break
            if now() > deadline:
                kill_group(p, signal.SIGKILL)
                raise Timeout(f"{os.path.basename(cmd[0])} > {timeout:.0f} s")
            for q in tree_pids(p.pid):
                try:
                    hwm[q] = max(hwm.get(q, 0), vm(q))
                except (OSError, RuntimeError):
                    pass
            time.sleep(0.01)
    finally:
        CTX.forget(p)
    errf.seek(0)
    err = errf.read()
    errf.close()
    os.unlink(errf.name)
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {p.returncode}: {' | '.join(err.strip().splitlines()[-3:])}")
    return el, sum(hwm.values())


class Watchdog:
    """For in-process steps on a mount: past the deadline, abort the FUSE
    connection (a hung call then fails) and report Timeout."""

    def __init__(self, seconds, mounts):
        self.seconds, self.mounts, self.fired = seconds, mounts, False

    def _fire(self):
        self.fired = True
        for m in self.mounts:
            fuse_abort(m)

    def __enter__(self):
        self.t = threading.Timer(self.seconds, self._fire)
        self.t.daemon = True
        self.t.start()
        return self

    def __exit__(self, et, ev, tb):
        self.t.cancel()
        if self.fired:
            raise Timeout(f"in-process step > {self.seconds:.0f} s (FUSE connection aborted)")
        return False


def rmrf(path):
    if not os.path.lexists(path):
        return
    for mp, _, _ in mountinfo():
        if mp == path or mp.startswith(path + "/"):
            umount_lazy(mp)
    sp.run(["rm", "-rf", "--one-file-system", path], timeout=600)


LIBC = ctypes.CDLL(None, use_errno=True)


def syncfs(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


DROP_OK = None


def drop_caches():
    global DROP_OK
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        DROP_OK = True
    except OSError as e:
        if DROP_OK is None:
            R.note(f"cannot drop caches ({e}): 'cold' figures are warm")
        DROP_OK = False


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def vm(pid, key="VmHWM"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # KiB
    raise RuntimeError(f"no {key} for pid {pid}")


def disk_bytes(path, skip=()):
    total = 0
    for d, dirs, files in os.walk(path):
        dirs[:] = [x for x in dirs if os.path.join(d, x) not in skip]
        for n in files + dirs:
            try:
                total += os.lstat(os.path.join(d, n)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def wait_for(pred, timeout, what, step=0.005, proc=None, errfile=None):
    deadline = now() + timeout
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            tail = ""
            if errfile and os.path.exists(errfile):
                with open(errfile, errors="replace") as f:
                    tail = f.read().replace("\r", "\n").strip().splitlines()[-2:]
                    tail = " | ".join(tail)
            raise RuntimeError(f"{what}: process exited {proc.returncode} {tail}")
        if now() > deadline:
            raise Timeout(f"{what} > {timeout:.0f} s")
        time.sleep(step)


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------- intermezzo

class IzoServer:
    def __init__(self, work, name, export=None):
        self.dir = os.path.join(work, name)
        self.export = export or os.path.join(self.dir, "export")
        self.state = os.path.join(self.dir, "state")
        self.vol = name
        self.port = free_port()
        self.p = None
        os.makedirs(self.export, exist_ok=True)
        os.makedirs(self.state, exist_ok=True)

    def start(self, timeout):
        logf = os.path.join(self.dir, "serve.log")
        with open(logf, "a") as lf:
            lf.write(f"--- start {time.ctime()}\n")
        t0 = now()
        self.p = CTX.spawn(f"izo serve {self.vol}",
                           [IZO, "serve", self.export, "--state", self.state, "--volume", self.vol,
                            "--listen", f"127.0.0.1:{self.port}"],
                           stopper=self.stop, stdout=open(logf, "a"), stderr=sp.STDOUT)
        start_ofs = len(read_text(logf))

        def ready():
            t = read_text(logf)[start_ofs:]
            return "izo: certificate fingerprint" in t and t

        t = wait_for(ready, timeout, "izo serve start", proc=self.p, errfile=logf)
        el = now() - t0
        self.fp = t.split("izo: certificate fingerprint ")[1].split()[0]
        return el

    def token(self):
        return sh([IZO, "token", "create", "--volume", self.vol, "--state", self.state], 30).strip()

    def stop(self):
        if self.p and self.p.poll() is None:
            stop_proc(self.p, 40)
        if self.p:
            CTX.forget(self.p)


class IzoMount:
    def __init__(self, srv, name):
        self.srv = srv
        self.mnt = os.path.join(srv.dir, name)
        self.cache = os.path.join(srv.dir, name + ".cache")
        self.out = os.path.join(srv.dir, name + ".out")
        self.err = os.path.join(srv.dir, name + ".err")
        self.tok = srv.token()
        self.p = None
        os.makedirs(self.mnt, exist_ok=True)

    def start(self, timeout):
        """Spawn `izo mount`; return the seconds until it prints 'izo: mounted'."""
        open(self.out, "w").close()
        t0 = now()
        self.p = CTX.spawn(f"izo mount {self.mnt}",
                           [IZO, "mount", f"127.0.0.1:{self.srv.port}/{self.srv.vol}", self.mnt,
                            "--token", self.tok, "--fingerprint", self.srv.fp, "--cache", self.cache],
                           stopper=self.stop, stdout=open(self.out, "a"), stderr=open(self.err, "a"))
        CTX.mounts.append(self.mnt)
        try:
            wait_for(lambda: "izo: mounted" in read_text(self.out), timeout, "izo mount", step=0.002,
                     proc=self.p, errfile=self.err)
        except Timeout:
            self.stop()
            raise
        return now() - t0

    def sync(self, timeout=300):
        deadline = now() + timeout
        while True:
            try:
                return sh([IZO, "sync", self.mnt], max(1, deadline - now()))
            except RuntimeError as e:
                if now() > deadline:
                    raise
                R.note(f"izo sync {os.path.basename(self.mnt)} failed, retrying: {e}")
                time.sleep(0.5)

    def status(self):
        return sh([IZO, "status", self.mnt], 30, check=False)

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except sp.TimeoutExpired:
                R.note(f"izo mount {self.mnt} did not stop within 20 s of SIGTERM; aborting it")
                fuse_abort(self.mnt)
                stop_proc(self.p, 5)
        if is_mounted(self.mnt):
            umount_lazy(self.mnt)
        if self.p:
            CTX.forget(self.p)
        if self.mnt in CTX.mounts:
            CTX.mounts.remove(self.mnt)


# ---------------------------------------------------------------- sshd + sshfs

class Sshd:
    def __init__(self, work):
        self.dir = os.path.join(work, "sshd")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.port = free_port()
        self.key = os.path.join(self.dir, "client_key")
        self.p = None

    def start(self):
        hk = os.path.join(self.dir, "host_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hk], 30)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key], 30)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        cfg = os.path.join(self.dir, "sshd_config")
        with open(cfg, "w") as f:
            f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {hk}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
UseDNS no
Subsystem sftp internal-sftp
""")
        os.makedirs("/run/sshd", exist_ok=True)
        self.p = CTX.spawn("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stopper=self.stop,
                           stdout=sp.DEVNULL, stderr=open(os.path.join(self.dir, "sshd.log"), "w"))

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return True
            except OSError:
                return False

        wait_for(up, 20, "sshd start", step=0.05, proc=self.p, errfile=os.path.join(self.dir, "sshd.log"))

    def stop(self):
        if self.p:
            stop_proc(self.p, 5)
            CTX.forget(self.p)


class Sshfs:
    def __init__(self, sshd, remote, mnt):
        self.sshd, self.remote, self.mnt = sshd, remote, mnt
        self.p = None
        os.makedirs(mnt, exist_ok=True)

    def start(self):
        err = self.mnt + ".err"
        self.p = CTX.spawn(f"sshfs {self.mnt}",
                           ["sshfs", "-f", f"root@127.0.0.1:{self.remote}", self.mnt, "-p", str(self.sshd.port),
                            "-o", f"IdentityFile={self.sshd.key},StrictHostKeyChecking=no,"
                                  "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR"],
                           stopper=self.stop, stdout=sp.DEVNULL, stderr=open(err, "w"))
        CTX.mounts.append(self.mnt)
        wait_for(lambda: is_mounted(self.mnt), 30, "sshfs mount", step=0.02, proc=self.p, errfile=err)

    def stop(self):
        if is_mounted(self.mnt):
            r = sp.run(["fusermount3", "-u", self.mnt], stderr=sp.DEVNULL, timeout=30)
            if r.returncode != 0:
                umount_lazy(self.mnt)
        if self.p:
            stop_proc(self.p, 5)
            CTX.forget(self.p)
        if self.mnt in CTX.mounts:
            CTX.mounts.remove(self.mnt)


# ---------------------------------------------------------------- syncthing

class Syncthing:
    FOLDER = "bench"

    def __init__(self, work, name, folder):
        self.name = name
        self.home = os.path.join(work, "st-" + name)
        self.folder = folder
        self.port, self.gui = free_port(), free_port()
        self.key = "izo-bench-" + "".join(random.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(20))
        self.p = None
        os.makedirs(folder, exist_ok=True)
        os.makedirs(os.path.join(folder, ".stfolder"), exist_ok=True)
        sh(["syncthing", "generate", f"--home={self.home}", "--no-default-folder", "--skip-port-probing"], 60)
        self.id = ET.parse(os.path.join(self.home, "config.xml")).getroot().find("device").get("id")

    def configure(self, peers):
        path = os.path.join(self.home, "config.xml")
        tree = ET.parse(path)
        root = tree.getroot()
        dev_tmpl = root.find("device")
        folder_tmpl = root.find("defaults/folder")
        for el in root.findall("device") + root.findall("folder"):
            root.remove(el)
        opts = root.find("options")
        settings = {
            "listenAddress": f"tcp://127.0.0.1:{self.port}",
            "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false",
            "relaysEnabled": "false", "natEnabled": "false", "urAccepted": "-1", "urSeen": "3",
            "autoUpgradeIntervalH": "0", "startBrowser": "false", "crashReportingEnabled": "false",
            "announceLANAddresses": "false", "stunKeepaliveStartS": "0", "stunKeepaliveMinS": "0",
            "setLowPriority": "false", "reconnectionIntervalS": "5", "restartOnWakeup": "false",
        }
        for k, v in settings.items():
            el = opts.find(k)
            if el is None:
                el = ET.SubElement(opts, k)
            el.text = v
        gui = root.find("gui")
        gui.set("tls", "false")
        gui.find("address").text = f"127.0.0.1:{self.gui}"
        gui.find("apikey").text = self.key
        devices = [(self.id, None)] + [(p.id, p.port) for p in peers]
        pos = 0
        for did, port in devices:
            d = ET.fromstring(ET.tostring(dev_tmpl))
            d.set("id", did)
            d.set("name", did[:7])
            d.find("address").text = f"tcp://127.0.0.1:{port}" if port else "dynamic"
            root.insert(pos, d)
            pos += 1
        f = ET.fromstring(ET.tostring(folder_tmpl))
        f.attrib.update({"id": self.FOLDER, "label": self.FOLDER, "path": self.folder, "type": "sendreceive",
                         "rescanIntervalS": "3600", "fsWatcherEnabled": "true", "fsWatcherDelayS": "1"})
        for d in f.findall("device"):
            f.remove(d)
        for i, (did, _) in enumerate(devices):
            d = ET.Element("device", {"id": did, "introducedBy": ""})
            ET.SubElement(d, "encryptionPassword")
            f.insert(1 + i, d)
        root.insert(pos, f)
        tree.write(path)

    def start(self, timeout=60):
        env = dict(os.environ, STNOUPGRADE="1", STNODEFAULTFOLDER="1", STNORESTART="1", HOME=self.home)
        t0 = now()
        self.p = CTX.spawn(f"syncthing {self.name}",
                           ["syncthing", "serve", f"--home={self.home}", "--no-browser", "--no-restart",
                            "--no-upgrade", "--logflags=3"],
                           stopper=self.stop, env=env, stdout=open(os.path.join(self.home, "log.txt"), "a"),
                           stderr=sp.STDOUT)
        wait_for(lambda: self.ping(), timeout, f"syncthing {self.name} start", step=0.02, proc=self.p,
                 errfile=os.path.join(self.home, "log.txt"))
        return t0

    def api(self, path, timeout=5):
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui}{path}", headers={"X-API-Key": self.key})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def ping(self):
        try:
            return self.api("/rest/system/ping", 1)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def status(self):
        try:
            return self.api(f"/rest/db/status?folder={self.FOLDER}")
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def counts(self):
        s = self.status()
        if not s:
            return None
        return s, (s.get("localFiles"), s.get("localDirectories"), s.get("localSymlinks"))

    def reset(self):
        """Forget everything: database and folder contents (keys and config stay)."""
        self.stop()
        for n in os.listdir(self.home):
            if n.startswith("index"):
                rmrf(os.path.join(self.home, n))
        rmrf(self.folder)
        os.makedirs(os.path.join(self.folder, ".stfolder"))

    def vmhwm(self):
        """VmHWM of the worker: `syncthing serve` is a monitor process whose
        child does the work (the monitor adds about 17 MB)."""
        return max(vm(p) for p in tree_pids(self.p.pid))

    def db_bytes(self):
        return sum(disk_bytes(os.path.join(self.home, n)) for n in os.listdir(self.home) if n.startswith("index"))

    def stop(self):
        if self.p:
            stop_proc(self.p, 20)
            CTX.forget(self.p)
            self.p = None


# ---------------------------------------------------------------- workload helpers

def tolerant(cmd, timeout, system, what):
    """Run cmd; with system set, errors it reports are noted (the time
    counts) instead of failing the cell."""
    rc, _, err = sh(cmd, timeout, check=False, full=True)
    if rc != 0:
        lines = [x for x in err.splitlines() if x.strip() and "Exiting with failure" not in x]
        if system is None:
            raise RuntimeError(f"{what} exited {rc}: {' | '.join(lines[:2])}")
        R.note(f"{system}: {what} exited {rc} with {len(lines)} error(s), e.g. {lines[0] if lines else '?'}")


def untar(dest, args, timeout, system=None):
    tolerant(["tar", "xf", args.w1, "-C", dest] + args.w1_sub, timeout, system, "tar xf")


def read_tree(d, timeout, system=None):
    drop_caches()
    t0 = now()
    tolerant(["bash", "-c", 'set -o pipefail; tar -C "$1" -cf - . | cat > /dev/null', "_", d], timeout, system,
             "tar cf (read back)")
    return now() - t0


def find_stat(d, timeout, system=None):
    drop_caches()
    t0 = now()
    tolerant(["bash", "-c", 'find "$1" -exec stat -c %s {} + > /dev/null', "_", d], timeout, system,
             "find -exec stat")
    return now() - t0


def tree_entries(d):
    n = 0
    for _, dirs, files in os.walk(d):
        n += len(dirs) + len(files)
    return n


def pick_files(d, k):
    files = []
    for dd, dirs, fs in os.walk(d):
        dirs.sort()
        dirs[:] = [x for x in dirs if not x.startswith(".st")]
        for f in sorted(fs):
            p = os.path.join(dd, f)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(os.path.relpath(p, d))
    step = max(1, len(files) // k)
    return files[::step][:k]


def change_files(root, rels, tag):
    for rel in rels:
        with open(os.path.join(root, rel), "ab") as f:
            f.write(f"\n/* izo-bench change {tag} */\n".encode())


def wait_changed(root, rels, tag, timeout, step=0.001):
    marker = f"/* izo-bench change {tag} */".encode()
    left = set(rels)
    deadline = now() + timeout
    while left:
        for rel in list(left):
            try:
                with open(os.path.join(root, rel), "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - 200))
                    if marker in f.read():
                        left.discard(rel)
            except FileNotFoundError:
                pass
        if left:
            if now() > deadline:
                raise Timeout(f"{len(left)} of {len(rels)} changes not visible after {timeout:.0f} s")
            time.sleep(step)


@contextlib.contextmanager
def cell(rows, system):
    """Measure into rows for system; a timeout or failure fills the cells
    and the suite goes on."""
    before = {r: len(R.vals.get((r, system), [])) for r in rows}

    def missing():  # the rows this attempt did not fill
        return [r for r in rows if len(R.vals.get((r, system), [])) == before[r]] or rows[:1]

    try:
        yield
    except Interrupted:
        raise
    except Timeout as e:
        left = missing()
        for r in left:
            R.fail(r, system, "timeout")
        R.note(f"{system}, {left[0]}: timeout ({e})")
    except Exception as e:  # noqa: BLE001 - any failure becomes an n/a cell
        short = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        left = missing()
        for r in left:
            R.fail(r, system, "n/a (error)")
        R.note(f"{system}, {left[0]}: {type(e).__name__}: {short}")
        if os.environ.get("IZO_BENCH_TRACE"):
            traceback.print_exc()


def have(tool, rows, system):
    if shutil.which(tool):
        return True
    for r in rows:
        R.fail(r, system, "n/a (not installed)")
    return False


# ---------------------------------------------------------------- workloads

def sshfs_up(work, rows):
    """A private sshd and an sshfs mount of WORK/sshfs-export at
    WORK/sshfs-mnt for `rows`: (sshd, sshfs), None where not started (not
    installed, or a step failed: its cells say so; what did start is
    returned, to be stopped)."""
    up = [None, None]
    if have("sshfs", rows, "sshfs") and have("/usr/sbin/sshd", rows, "sshfs"):
        with cell(rows, "sshfs"):
            up[0] = Sshd(work)
            up[0].start()
            os.makedirs(os.path.join(work, "sshfs-export"))
            up[1] = Sshfs(up[0], os.path.join(work, "sshfs-export"), os.path.join(work, "sshfs-mnt"))
            up[1].start()
    return up[0], up[1]


def sshfs_down(sshd, sshfs):
    """Stop what sshfs_up started."""
    if sshfs:
        sshfs.stop()
    if sshd:
        sshd.stop()


FS_ROWS = ["untar", "untar_ret", "readback", "findstat"]


def w_tree(args, work):
    """Untar W1, read it back, find + stat it: native, intermezzo, sshfs."""
    t = args.timeout
    sshd, sshfs = sshfs_up(work, FS_ROWS)
    for r in range(args.runs):
        log(f"tree: run {r + 1}/{args.runs}")
        with cell(FS_ROWS, "native"):
            d = os.path.join(work, f"native-{r}")
            os.makedirs(d)
            t0 = now()
            untar(d, args, t)
            t1 = now()
            syncfs(d)
            t2 = now()
            R.add("untar_ret", "native", t1 - t0)
            R.add("untar", "native", t2 - t0)
            R.add("readback", "native", read_tree(d, t))
            R.add("findstat", "native", find_stat(d, t))
            rmrf(d)
        with cell(FS_ROWS, "intermezzo"):
            srv = IzoServer(work, f"tree{r}")
            m = None
            try:
                srv.start(120)
                m = IzoMount(srv, "mnt")
                m.start(120)
                t0 = now()
                untar(m.mnt, args, t, system="intermezzo")
                t1 = now()
                m.sync(t)
                t2 = now()
                R.add("untar_ret", "intermezzo", t1 - t0)
                R.add("untar", "intermezzo", t2 - t0)
                R.add("readback", "intermezzo", read_tree(m.mnt, t, "intermezzo"))
                R.add("findstat", "intermezzo", find_stat(m.mnt, t, "intermezzo"))
                check_tree_count(m.mnt, args.w1_entries, "intermezzo tree")
            finally:
                if m:
                    m.stop()
                srv.stop()
                rmrf(srv.dir)
        if sshfs:
            with cell(FS_ROWS, "sshfs"):
                d = os.path.join(sshfs.mnt, f"run{r}")
                os.makedirs(d)
                t0 = now()
                untar(d, args, t, system="sshfs")
                t1 = now()
                syncfs(os.path.join(work, "sshfs-export"))  # the server's disk
                t2 = now()
                R.add("untar_ret", "sshfs", t1 - t0)
                R.add("untar", "sshfs", t2 - t0)
                R.add("readback", "sshfs", read_tree(d, t, "sshfs"))
                R.add("findstat", "sshfs", find_stat(d, t, "sshfs"))
                check_tree_count(d, args.w1_entries, "sshfs tree")
                rmrf(os.path.join(work, "sshfs-export", f"run{r}"))
    sshfs_down(sshd, sshfs)
    for s in ["rsync", "unison", "syncthing"]:
        for row in FS_ROWS:
            R.fail(row, s, "-")


def check_tree_count(d, expect, what):
    got = tree_entries(d)
    if got != expect:
        R.note(f"{what}: {got} entries, W1 has {expect} (wrong result?)")


W2_ROWS = ["seqwrite", "seqread_cold", "seqread_cached", "randread"]


def w_w2(args, work):
    """Sequential write and read of W2, 4 KiB random reads with fio."""
    t = args.timeout
    with open(args.w2, "rb") as f:
        data = f.read(args.w2_bytes)
    n = len(data)
    mv = memoryview(data)
    chunk = 1 << 20

    def write(path, extra_sync=None):
        t0 = now()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for o in range(0, n, chunk):
                os.write(fd, mv[o:o + chunk])
            try:
                os.fsync(fd)
            except OSError as e:
                R.note(f"fsync on {path}: {e}")
        finally:
            os.close(fd)
        if extra_sync:
            extra_sync()
        return n / (now() - t0) / 1e6

    def read(path):
        buf = bytearray(chunk)
        t0 = now()
        got = 0
        with open(path, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                got += k
        if got != n:
            raise RuntimeError(f"read {got} bytes of {n}")
        return n / (now() - t0) / 1e6

    def fio(path):
        if not shutil.which("fio"):
            raise FileNotFoundError("fio not installed")
        drop_caches()
        out = sh(["fio", "--name=rand4k", f"--filename={path}", "--rw=randread", "--bs=4k", "--ioengine=psync",
                  f"--size={n}", f"--runtime={args.fio_secs}", "--time_based", "--invalidate=1", "--fadvise_hint=0",
                  "--output-format=json"], args.fio_secs + 120)
        return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]

    def one(system, path, extra_sync=None, rand=True):
        R.add("seqwrite", system, write(path, extra_sync))
        drop_caches()
        R.add("seqread_cold", system, read(path))
        read(path)
        R.add("seqread_cached", system, read(path))
        if rand:
            with cell(["randread"], system):
                R.add("randread", system, fio(path))

    sshd, sshfs = sshfs_up(work, W2_ROWS)
    for r in range(args.runs):
        log(f"w2: run {r + 1}/{args.runs} ({n >> 20} MiB)")
        with cell(W2_ROWS[:3], "native"):
            p = os.path.join(work, "native.w2")
            one("native", p)
            os.unlink(p)
        with cell(W2_ROWS[:3], "intermezzo"):
            srv = IzoServer(work, f"w2r{r}")
            m = None
            try:
                srv.start(120)
                m = IzoMount(srv, "mnt")
                m.start(120)
                with Watchdog(t * 2, [m.mnt]):
                    one("intermezzo", os.path.join(m.mnt, "w2.bin"), extra_sync=lambda: m.sync(t))
            finally:
                if m:
                    m.stop()
                srv.stop()
                rmrf(srv.dir)
        if sshfs:
            with cell(W2_ROWS[:3], "sshfs"):
                p = os.path.join(sshfs.mnt, "w2.bin")
                with Watchdog(t * 2, [sshfs.mnt]):
                    one("sshfs", p)
                    os.unlink(p)
    sshfs_down(sshd, sshfs)
    for s in ["rsync", "unison", "syncthing"]:
        for row in W2_ROWS:
            R.fail(row, s, "-")


META_ROWS = ["meta_create", "meta_stat", "meta_rename", "meta_delete"]


def storm(d, n, barrier, system):
    os.makedirs(d)
    t0 = now()
    for i in range(n):
        os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    barrier()
    R.add("meta_create", system, now() - t0)
    drop_caches()
    t0 = now()
    for i in range(n):
        os.stat(f"{d}/f{i}")
    R.add("meta_stat", system, now() - t0)
    t0 = now()
    for i in range(n):
        os.rename(f"{d}/f{i}", f"{d}/g{i}")
    barrier()
    R.add("meta_rename", system, now() - t0)
    t0 = now()
    for i in range(n):
        os.unlink(f"{d}/g{i}")
    barrier()
    R.add("meta_delete", system, now() - t0)
    left = os.listdir(d)
    if left:
        raise RuntimeError(f"{len(left)} entries left after deleting all")
    os.rmdir(d)


def w_meta(args, work):
    """Metadata storm: create, stat, rename, delete N empty files in one directory."""
    n, t = args.meta, args.timeout

    def fsync_dir(d):
        def b():
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return b

    sshd, sshfs = sshfs_up(work, META_ROWS)
    for r in range(args.runs):
        log(f"meta: run {r + 1}/{args.runs} ({n} files)")
        with cell(META_ROWS, "native"):
            d = os.path.join(work, f"native-meta{r}")
            storm(d, n, fsync_dir(d), "native")
        with cell(META_ROWS, "intermezzo"):
            srv = IzoServer(work, f"meta{r}")
            m = None
            try:
                srv.start(120)
                m = IzoMount(srv, "mnt")
                m.start(120)
                with Watchdog(t * 4, [m.mnt]):
                    storm(os.path.join(m.mnt, "storm"), n, lambda: m.sync(t), "intermezzo")
            finally:
                if m:
                    m.stop()
                srv.stop()
                rmrf(srv.dir)
        if sshfs:
            with cell(META_ROWS, "sshfs"):
                with Watchdog(t * 4, [sshfs.mnt]):
                    storm(os.path.join(sshfs.mnt, f"storm{r}"), n,
                          lambda: syncfs(os.path.join(work, "sshfs-export")), "sshfs")
    sshfs_down(sshd, sshfs)
    for s in ["rsync", "unison", "syncthing"]:
        for row in META_ROWS:
            R.fail(row, s, "-")


REPL_ROWS = ["repl_init", "incr10", "prop_p50", "prop_p99", "restart_client", "restart_server",
             "mem_client_w1", "disk_client_w1", "repl_server"]


def percentile(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def propagate(src, dst, samples, per_timeout, step, pause=0.002):
    """Write 9 bytes at offset 0 of a file under src; time until a fresh
    open + read under dst returns them. Returns (latencies ms, timeouts)."""
    lat, timeouts = [], 0
    for i in range(samples):
        v = (f"{random.randrange(10 ** 8):08d}\n").encode()
        t0 = now()
        fd = os.open(src, os.O_WRONLY)
        os.pwrite(fd, v, 0)
        os.close(fd)
        while True:
            try:
                fd = os.open(dst, os.O_RDONLY)
                b = os.pread(fd, 9, 0)
                os.close(fd)
            except FileNotFoundError:
                b = b""
            if b == v:
                lat.append((now() - t0) * 1e3)
                break
            if now() - t0 > per_timeout:
                timeouts += 1
                break
            time.sleep(step)
        time.sleep(pause)
    return lat, timeouts


def rec_prop(system, lat, timeouts, samples):
    if timeouts:
        R.note(f"{system} propagation: {timeouts} of {samples} samples timed out")
    if not lat:
        raise Timeout("every propagation sample timed out")
    R.add("prop_p50", system, percentile(lat, 50))
    R.add("prop_p99", system, percentile(lat, 99))
    R.note(f"{system} propagation: {len(lat)} samples, p50 {percentile(lat, 50):.2f} ms, "
           f"p99 {percentile(lat, 99):.2f} ms, max {max(lat):.2f} ms")


def izo_first_start(srv, entries, t):
    """Start the server on a populated export; return the seconds until a
    client sees all of it. (The server answers before its first scan of the
    export is journaled: a client mounted at once gets part of the tree.)"""
    t0 = now()
    srv.start(t)
    probe = IzoMount(srv, "probe")
    try:
        probe.start(t)
        first = tree_entries(probe.mnt)
        if first < entries:
            R.note(f"intermezzo: a client mounted right after the server's first start had {first} of "
                   f"{entries} entries; the rest came through the stream")
        wait_for(lambda: tree_entries(probe.mnt) >= entries, t, "the server's first scan", step=0.1)
        return now() - t0
    finally:
        probe.stop()
        rmrf(probe.cache)
        rmrf(probe.mnt)


def w_repl(args, work):
    """Initial replication, 10-file incremental, propagation, restart, memory on W1."""
    t = args.timeout
    src = os.path.join(work, "src")
    os.makedirs(src)
    untar(src, args, t)
    entries = tree_entries(src)
    rels = pick_files(src, 10)
    log(f"repl: W1{' ' + ' '.join(args.w1_sub) if args.w1_sub else ''}: {entries} entries; changing {len(rels)} files")
    for s in ["sshfs"]:
        for row in ["repl_init", "incr10", "restart_client", "restart_server", "mem_client_w1", "disk_client_w1",
                    "repl_server"]:
            R.fail(row, s, "-")
    for row in ["incr10", "prop_p50", "prop_p99", "restart_client", "restart_server", "mem_client_w1",
                "disk_client_w1", "repl_server"]:
        R.fail(row, "native", "-")
    for s in ["rsync", "unison"]:
        for row in ["prop_p50", "prop_p99", "restart_server", "repl_server"]:
            R.fail(row, s, "-")
    R.fail("restart_server", "syncthing", "-")
    R.fail("repl_server", "syncthing", "-")

    # native: cp -a, to durable
    for r in range(args.runs):
        with cell(["repl_init"], "native"):
            d = os.path.join(work, "cp-dst")
            t0 = now()
            sh(["cp", "-a", src, d], t)
            syncfs(d)
            R.add("repl_init", "native", now() - t0)
            rmrf(d)

    # ---- intermezzo
    srv = c1 = c2 = None
    with cell(["repl_init", "repl_server", "mem_client_w1", "disk_client_w1"], "intermezzo"):
        exp = os.path.join(work, "izo-export")
        os.makedirs(exp)
        untar(exp, args, t)
        syncfs(exp)
        srv = IzoServer(work, "w1", export=exp)
        R.add("repl_server", "intermezzo", izo_first_start(srv, entries, t))
        for r in range(args.runs):
            log(f"repl: intermezzo run {r + 1}/{args.runs}")
            m = IzoMount(srv, f"c{r}")
            R.add("repl_init", "intermezzo", m.start(t))
            if r < args.runs - 1:
                m.stop()
                rmrf(m.cache)
                rmrf(m.mnt)
            else:
                c1 = m
        check_tree_count(c1.mnt, entries, "intermezzo replica of W1")
        with Watchdog(t, [c1.mnt]):
            sh(["bash", "-c", 'find "$1" -exec stat -c %s {} + > /dev/null', "_", c1.mnt], t)
            for rel in pick_files(c1.mnt, 1000):
                with open(os.path.join(c1.mnt, rel), "rb") as f:
                    f.read()
        R.add("mem_client_w1", "intermezzo", vm(c1.p.pid) * 1024 / entries / 1000)
        R.add("disk_client_w1", "intermezzo",
              disk_bytes(c1.cache, skip={os.path.join(c1.cache, "data")}) / entries)
        R.note(f"intermezzo on W1: server VmHWM {vm(srv.p.pid) / 1024:.0f} MiB, "
               f"state {disk_bytes(srv.state) / 1e6:.1f} MB")
    if c1:
        with cell(["incr10", "prop_p50", "prop_p99", "restart_client", "restart_server"], "intermezzo"):
            c2 = IzoMount(srv, "peer")
            c2.start(t)

    # ---- rsync
    rs_dst = os.path.join(work, "rsync-dst")
    if have("rsync", ["repl_init", "incr10", "restart_client", "mem_client_w1", "disk_client_w1"], "rsync"):
        R.fail("disk_client_w1", "rsync", "-")
        for r in range(args.runs):
            with cell(["repl_init", "mem_client_w1"], "rsync"):
                rmrf(rs_dst)
                t0 = now()
                _, rss = sh_rusage(["rsync", "-a", src + "/", rs_dst + "/"], t)
                syncfs(rs_dst)
                R.add("repl_init", "rsync", now() - t0)
                R.add("mem_client_w1", "rsync", rss * 1024 / entries / 1000)

    # ---- unison
    un_dst = os.path.join(work, "unison-dst")
    un_arch = os.path.join(work, "unison-archive")
    un_env = dict(os.environ, UNISON=un_arch, HOME=work)

    def unison_cmd():
        return ["unison", src, un_dst, "-batch", "-auto", "-silent", "-times", "-confirmbigdel=false",
                "-ignore", "Name .stfolder"]

    if have("unison", ["repl_init", "incr10", "restart_client", "mem_client_w1", "disk_client_w1"], "unison"):
        for r in range(args.runs):
            with cell(["repl_init", "mem_client_w1", "disk_client_w1"], "unison"):
                rmrf(un_dst)
                rmrf(un_arch)
                os.makedirs(un_dst)
                os.makedirs(un_arch)
                t0 = now()
                _, rss = sh_rusage(unison_cmd(), t, env=un_env)
                syncfs(un_dst)
                R.add("repl_init", "unison", now() - t0)
                R.add("mem_client_w1", "unison", rss * 1024 / entries / 1000)
                R.add("disk_client_w1", "unison", disk_bytes(un_arch) / entries)
                check_tree_count(un_dst, entries, "unison replica")

    # ---- syncthing
    sta = stb = None
    st_rows = ["repl_init", "incr10", "prop_p50", "prop_p99", "restart_client", "mem_client_w1", "disk_client_w1"]
    if have("syncthing", st_rows, "syncthing"):
        with cell(st_rows, "syncthing"):
            a_dir = os.path.join(work, "st-a-folder")
            os.makedirs(a_dir)
            untar(a_dir, args, t)
            sta = Syncthing(work, "a", a_dir)
            stb = Syncthing(work, "b", os.path.join(work, "st-b-folder"))
            sta.configure([stb])
            stb.configure([sta])
            sta.start()
            log("repl: syncthing A scanning W1")

            def a_ready():
                c = sta.counts()
                return c and c[0].get("state") == "idle" and (c[1][0] or 0) > 0 and c
            a = wait_for(a_ready, t, "syncthing A initial scan", step=0.1)
            time.sleep(1)
            a = wait_for(a_ready, t, "syncthing A initial scan", step=0.1)
            want = a[1]
            if sum(x or 0 for x in want) != entries:
                R.note(f"syncthing A indexed {want} (files, dirs, symlinks); the tree has {entries} entries")
            for r in range(args.runs):
                log(f"repl: syncthing run {r + 1}/{args.runs}")
                with cell(["repl_init", "mem_client_w1", "disk_client_w1"], "syncthing"):
                    stb.reset()
                    t0 = stb.start()

                    def b_done():
                        c = stb.counts()
                        return (c and c[0].get("state") == "idle" and c[0].get("needTotalItems") == 0
                                and c[1] == want)
                    wait_for(b_done, t, "syncthing B initial replication", step=0.05)
                    R.add("repl_init", "syncthing", now() - t0)
                    R.add("mem_client_w1", "syncthing", stb.vmhwm() * 1024 / entries / 1000)
                    R.add("disk_client_w1", "syncthing", stb.db_bytes() / entries)
            if not stb.p:
                raise RuntimeError("syncthing B is not running")

    # ---- 10 changed files visible on another replica
    for r in range(args.runs):
        log(f"repl: 10-file change, run {r + 1}/{args.runs}")
        if c1 and c2:
            with cell(["incr10"], "intermezzo"):
                c1.sync(t)
                c2.sync(t)
                tag = f"izo incr {r} {random.random()}"
                with Watchdog(t + 30, [c1.mnt, c2.mnt]):
                    t0 = now()
                    change_files(c1.mnt, rels, tag)
                    wait_changed(c2.mnt, rels, tag, t)
                    R.add("incr10", "intermezzo", now() - t0)
        if os.path.isdir(rs_dst) and shutil.which("rsync"):
            with cell(["incr10"], "rsync"):
                tag = f"rsync incr {r} {random.random()}"
                t0 = now()
                change_files(src, rels, tag)
                sh(["rsync", "-a", src + "/", rs_dst + "/"], t)
                syncfs(rs_dst)
                R.add("incr10", "rsync", now() - t0)
                wait_changed(rs_dst, rels, tag, 1)
        if os.path.isdir(un_arch) and shutil.which("unison"):
            with cell(["incr10"], "unison"):
                tag = f"unison incr {r} {random.random()}"
                t0 = now()
                change_files(src, rels, tag)
                sh(unison_cmd(), t, env=un_env)
                syncfs(un_dst)
                R.add("incr10", "unison", now() - t0)
                wait_changed(un_dst, rels, tag, 1)
        if stb and stb.p:
            with cell(["incr10"], "syncthing"):
                tag = f"st incr {r} {random.random()}"
                t0 = now()
                change_files(sta.folder, rels, tag)
                wait_changed(stb.folder, rels, tag, t, step=0.005)
                R.add("incr10", "syncthing", now() - t0)
                settle_syncthing(sta, stb, t)

    # ---- one small write's propagation
    log(f"repl: propagation ({args.prop} samples on intermezzo)")
    if c1 and c2:
        with cell(["prop_p50", "prop_p99"], "intermezzo"):
            p1 = os.path.join(c1.mnt, "izo-bench-prop")
            with open(p1, "wb") as f:
                f.write(b"0" * 64)
            c1.sync(t)
            wait_for(lambda: os.path.exists(os.path.join(c2.mnt, "izo-bench-prop")), t, "prop file on peer")
            with Watchdog(args.prop * 6 + t, [c1.mnt, c2.mnt]):
                lat, to = propagate(p1, os.path.join(c2.mnt, "izo-bench-prop"), args.prop, 5, 0.0002)
            rec_prop("intermezzo", lat, to, args.prop)
    if stb and stb.p:
        with cell(["prop_p50", "prop_p99"], "syncthing"):
            pa, pb = os.path.join(sta.folder, "izo-bench-prop"), os.path.join(stb.folder, "izo-bench-prop")
            with open(pa, "wb") as f:
                f.write(b"0" * 64)
            wait_for(lambda: os.path.exists(pb), t, "prop file on syncthing B", step=0.05)
            settle_syncthing(sta, stb, t)
            lat, to = propagate(pa, pb, args.prop_peer, 30, 0.002, pause=0.5)
            rec_prop("syncthing", lat, to, args.prop_peer)
    if have("sshfs", ["prop_p50", "prop_p99"], "sshfs") and shutil.which("/usr/sbin/sshd"):
        with cell(["prop_p50", "prop_p99"], "sshfs"):
            sshd = Sshd(work)
            exp = os.path.join(work, "sshfs-prop")
            os.makedirs(exp)
            with open(os.path.join(exp, "izo-bench-prop"), "wb") as f:
                f.write(b"0" * 64)
            a = Sshfs(sshd, exp, os.path.join(work, "sshfs-a"))
            b = Sshfs(sshd, exp, os.path.join(work, "sshfs-b"))
            try:
                sshd.start()
                a.start()
                b.start()
                with Watchdog(args.prop_peer * 40 + 30, [a.mnt, b.mnt]):
                    lat, to = propagate(os.path.join(a.mnt, "izo-bench-prop"), os.path.join(b.mnt, "izo-bench-prop"),
                                        args.prop_peer, 30, 0.001)
                rec_prop("sshfs", lat, to, args.prop_peer)
            finally:
                a.stop()
                b.stop()
                sshd.stop()

    # ---- restart cost with 10 changes made meanwhile
    for r in range(args.runs):
        log(f"repl: restart, run {r + 1}/{args.runs}")
        if c1 and c2:
            with cell(["restart_client"], "intermezzo"):
                c2.stop()
                tag = f"izo restart {r} {random.random()}"
                change_files(c1.mnt, rels, tag)
                c1.sync(t)
                t0 = now()
                c2.start(t)
                with Watchdog(t + 30, [c2.mnt]):
                    wait_changed(c2.mnt, rels, tag, t)
                R.add("restart_client", "intermezzo", now() - t0)
            with cell(["restart_server"], "intermezzo"):
                c1.sync(t)
                c2.sync(t)
                srv.stop()
                tag = f"izo server restart {r} {random.random()}"
                change_files(srv.export, rels, tag)
                t0 = now()
                srv.start(t)
                with Watchdog(t + 30, [c1.mnt]):
                    wait_changed(c1.mnt, rels, tag, t)
                R.add("restart_server", "intermezzo", now() - t0)
        if os.path.isdir(rs_dst) and shutil.which("rsync"):
            with cell(["restart_client"], "rsync"):
                tag = f"rsync restart {r} {random.random()}"
                change_files(src, rels, tag)
                t0 = now()
                sh(["rsync", "-a", src + "/", rs_dst + "/"], t)
                syncfs(rs_dst)
                R.add("restart_client", "rsync", now() - t0)
        if os.path.isdir(un_arch) and shutil.which("unison"):
            with cell(["restart_client"], "unison"):
                tag = f"unison restart {r} {random.random()}"
                change_files(src, rels, tag)
                t0 = now()
                sh(unison_cmd(), t, env=un_env)
                syncfs(un_dst)
                R.add("restart_client", "unison", now() - t0)
        if stb and stb.p:
            with cell(["restart_client"], "syncthing"):
                stb.stop()
                seq0 = (sta.status() or {}).get("sequence", 0)
                tag = f"st restart {r} {random.random()}"
                change_files(sta.folder, rels, tag)
                # A has seen and indexed the changes before B comes back
                wait_for(lambda: (lambda s: s and s.get("state") == "idle" and s.get("sequence", 0) >= seq0 + len(rels))(
                    sta.status()), t, "syncthing A indexing the changes", step=0.05)
                t0 = stb.start()
                wait_changed(stb.folder, rels, tag, t, step=0.005)
                R.add("restart_client", "syncthing", now() - t0)
                settle_syncthing(sta, stb, t)

    for x in (c2, c1):
        if x:
            x.stop()
    if srv:
        srv.stop()
    for x in (stb, sta):
        if x:
            x.stop()


def settle_syncthing(sta, stb, t):
    def idle():
        a, b = sta.status(), stb.status()
        return (a and b and a.get("state") == "idle" and b.get("state") == "idle"
                and b.get("needTotalItems") == 0 and a.get("needTotalItems") == 0)
    wait_for(idle, t, "syncthing settling", step=0.05)


MEM_ROWS = ["mem_serve", "mem_init", "mem_client", "mem_server", "disk_client_all", "disk_client", "disk_server"]


def w_mem(args, work):
    """Memory and disk per file: intermezzo with N small files."""
    n, t = args.mem_files, args.timeout
    for s in SYSTEMS:
        if s != "intermezzo":
            for row in MEM_ROWS:
                R.fail(row, s, "-")
    with cell(MEM_ROWS, "intermezzo"):
        exp = os.path.join(work, "mem-export")
        per = 1000
        for dnum in range(n // per):
            d = os.path.join(exp, f"d{dnum:03d}")
            os.makedirs(d)
            for i in range(per):
                with open(os.path.join(d, f"f{i:04d}"), "w") as f:
                    f.write(f"{dnum} {i}\n")
        syncfs(exp)
        log(f"mem: {n} files made; starting the server")
        srv = IzoServer(work, "mem", export=exp)
        m = None
        try:
            R.add("mem_serve", "intermezzo", izo_first_start(srv, n + n // per, t * 2))
            m = IzoMount(srv, "mnt")
            R.add("mem_init", "intermezzo", m.start(t * 2))
            log("mem: mounted; find -exec stat, read 1,000 files")
            with Watchdog(t * 2, [m.mnt]):
                sh(["bash", "-c", 'find "$1" -exec stat -c %s {} + > /dev/null', "_", m.mnt], t * 2)
                step = max(1, n // 1000)
                for k in range(0, n, step):
                    with open(os.path.join(m.mnt, f"d{k // per:03d}", f"f{k % per:04d}")) as f:
                        f.read()
            files = n
            R.add("mem_client", "intermezzo", vm(m.p.pid) * 1024 / files / 1000)
            R.add("mem_server", "intermezzo", vm(srv.p.pid) * 1024 / files / 1000)
            R.add("disk_client_all", "intermezzo", disk_bytes(m.cache) / files)
            R.add("disk_client", "intermezzo", disk_bytes(m.cache, skip={os.path.join(m.cache, "data")}) / files)
            R.add("disk_server", "intermezzo", disk_bytes(srv.state) / files)
            R.note(f"intermezzo with {n} small files: client VmHWM {vm(m.p.pid) / 1024:.0f} MiB, "
                   f"VmRSS {vm(m.p.pid, 'VmRSS') / 1024:.0f} MiB; server VmHWM {vm(srv.p.pid) / 1024:.0f} MiB")
        finally:
            if m:
                m.stop()
            srv.stop()


# ---------------------------------------------------------------- table

def rows(args):
    sub = " (" + " ".join(args.w1_sub) + ")" if args.w1_sub else ""
    w1 = f"W1{sub}"
    mib = args.w2_bytes >> 20
    return [
        ("tree", Row("untar", f"untar {w1}, to durable (s)", "s")),
        ("tree", Row("untar_ret", f"untar {w1}, until tar returns (s)", "s")),
        ("tree", Row("readback", f"read {w1} back, cold (s)", "s")),
        ("tree", Row("findstat", f"find + stat {w1}, cold (s)", "s")),
        ("w2", Row("seqwrite", f"sequential write W2 ({mib} MiB) + fsync (MB/s)", "MB/s", "high")),
        ("w2", Row("seqread_cold", "sequential read W2, cold (MB/s)", "MB/s", "high")),
        ("w2", Row("seqread_cached", "sequential read W2, cached (MB/s)", "MB/s", "high")),
        ("w2", Row("randread", f"4 KiB random reads, fio {args.fio_secs} s (IOPS)", "IOPS", "high")),
        ("meta", Row("meta_create", f"metadata: create {args.meta:,} empty files (s)", "s")),
        ("meta", Row("meta_stat", f"metadata: stat {args.meta:,}, cold (s)", "s")),
        ("meta", Row("meta_rename", f"metadata: rename {args.meta:,} (s)", "s")),
        ("meta", Row("meta_delete", f"metadata: delete {args.meta:,} (s)", "s")),
        ("repl", Row("repl_server", f"server first start on {w1}, until a client sees all (s)", "s", native=False)),
        ("repl", Row("repl_init", f"initial replication of {w1} to a new client (s)", "s")),
        ("repl", Row("incr10", "10 changed files visible on another replica (s)", "s", native=False)),
        ("repl", Row("prop_p50", "one small write, other client sees it: p50 (ms)", "ms", native=False)),
        ("repl", Row("prop_p99", "one small write, other client sees it: p99 (ms)", "ms", native=False)),
        ("repl", Row("restart_client", "client restart, 10 changes meanwhile, until seen (s)", "s", native=False)),
        ("repl", Row("restart_server", "server restart, 10 export changes meanwhile, until seen (s)", "s",
                     native=False)),
        ("repl", Row("mem_client_w1", f"client peak RSS per entry, {w1} (kB)", "kB", native=False)),
        ("repl", Row("disk_client_w1", f"client metadata on disk per entry, {w1} (B)", "B", native=False)),
        ("mem", Row("mem_serve", f"server first start on {args.mem_files:,} small files, until a client sees "
                                 "all (s)", "s", native=False)),
        ("mem", Row("mem_init", f"initial replication of {args.mem_files:,} small files (s)", "s", native=False)),
        ("mem", Row("mem_client", f"client VmHWM per file, {args.mem_files:,} files (kB)", "kB", native=False)),
        ("mem", Row("mem_server", f"server VmHWM per file, {args.mem_files:,} files (kB)", "kB", native=False)),
        ("mem", Row("disk_client_all", f"client cache on disk per file, {args.mem_files:,} files (B)", "B",
                    native=False)),
        ("mem", Row("disk_client", f"client metadata on disk per file, {args.mem_files:,} files (B)", "B",
                    native=False)),
        ("mem", Row("disk_server", f"server state on disk per file, {args.mem_files:,} files (B)", "B",
                    native=False)),
    ]


def cell_text(row, system):
    v = R.vals.get((row.key, system))
    fails = R.fails.get((row.key, system), [])
    if not v:
        if not fails:
            return "—" if system == "native" and not row.native else "not run"
        return fails[0] if fails[0] != "-" else "—"
    m = statistics.median(v)
    s = fmt_num(m)
    nat = R.median(row.key, "native") if row.native else None
    if nat and system != "native":
        s += f" ({m / nat:.2f}×)"
    bad = [f for f in fails if f != "-"]
    if bad:
        s += f" +{len(bad)} {bad[0]}"
    return s


def table(args):
    lines = []
    hdr = ["workload"] + SYSTEMS
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|---|" + "---:|" * len(SYSTEMS))
    for group, row in rows(args):
        if group not in args.only:
            continue
        lines.append("| " + " | ".join([row.label] + [cell_text(row, s) for s in SYSTEMS]) + " |")
    return "\n".join(lines)


def targets(args):
    def m(row, s):
        return R.median(row, s)

    def ratio(a, b, what, op, lim, fmt="{:.2f}×"):
        if a is None or b is None:
            return what, "n/a", "not measured"
        x = a / b
        ok = x >= lim if op == ">=" else x <= lim if op == "<=" else x < lim
        return what, fmt.format(x), "**met**" if ok else "**missed**"

    def absolute(v, what, lim, unit):
        if v is None:
            return what, "n/a", "not measured"
        return what, f"{v:.2f} {unit}", "**met**" if v < lim else "**missed**"

    out = []
    if "w2" in args.only:
        out.append(ratio(m("seqread_cached", "intermezzo"), m("seqread_cached", "native"),
                         "cached sequential read ≥ 0.95 × native", ">=", 0.95))
    if "tree" in args.only:
        out.append(ratio(m("untar", "intermezzo"), m("untar", "native"), "untar of W1 ≤ 2 × native", "<=", 2))
        out.append(ratio(m("untar", "sshfs"), m("untar", "intermezzo"), "untar of W1 ≥ 5× faster than sshfs",
                         ">=", 5))
    if "repl" in args.only:
        out.append(ratio(m("repl_init", "intermezzo"), m("repl_init", "rsync"),
                         "initial replication ≤ 1.5 × rsync -a", "<=", 1.5))
        for p in ("unison", "syncthing"):
            out.append(ratio(m("repl_init", p), m("repl_init", "intermezzo"),
                             f"initial replication ≥ 3× faster than {p}", ">=", 3))
        for p in ("syncthing", "unison"):
            out.append(ratio(m("incr10", p), m("incr10", "intermezzo"),
                             f"10-file incremental ≥ 10× sooner than {p}", ">=", 10))
        out.append(absolute(m("prop_p50", "intermezzo"), "propagation p50 < 10 ms", 10, "ms"))
        out.append(absolute(m("prop_p99", "intermezzo"), "propagation p99 < 50 ms", 50, "ms"))
    if "mem" in args.only:
        what = "client memory ≤ 1 kB per file at 100,000 files"
        if args.mem_files != 100000:
            what += f" (measured at {args.mem_files:,}: not the target's size)"
        v = m("mem_client", "intermezzo")
        out.append((what, "n/a" if v is None else f"{v:.2f} kB", "not measured" if v is None else
                    ("**met**" if v <= 1 else "**missed**")))
    lines = ["| target | figure | |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in out]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main():
    global CTX
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (a few minutes)")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--only", default="tree,w2,meta,repl,mem",
                    help="comma-separated workload groups: tree,w2,meta,repl,mem")
    ap.add_argument("--w1-sub", help="W1 members to use (space-separated, e.g. './net'); default all, --quick ./net")
    ap.add_argument("--w2-mib", type=int)
    ap.add_argument("--meta", type=int)
    ap.add_argument("--prop", type=int)
    ap.add_argument("--prop-peer", type=int)
    ap.add_argument("--mem-files", type=int)
    ap.add_argument("--fio-secs", type=int)
    ap.add_argument("--timeout", type=float, help="seconds allowed for each step (default 600, --quick 180)")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    q = args.quick
    args.runs = args.runs or (1 if q else 3)
    args.w1_sub = (args.w1_sub.split() if args.w1_sub is not None else (["./net"] if q else []))
    args.w2_bytes = (args.w2_mib or (128 if q else 1024)) << 20
    args.meta = args.meta or (5000 if q else 50000)
    args.prop = args.prop or (100 if q else 1000)
    args.prop_peer = args.prop_peer or (5 if q else 20)
    args.mem_files = args.mem_files or (10000 if q else 100000)
    args.mem_files = max(1000, args.mem_files // 1000 * 1000)
    args.fio_secs = args.fio_secs or (3 if q else 10)
    args.timeout = args.timeout or (180 if q else 600)
    args.only = set(args.only.split(","))
    data = os.environ.get("IZO_WORKLOADS", "/var/tmp/izo-workloads")
    args.w1, args.w2 = os.path.join(data, "w1.tar"), os.path.join(data, "w2.bin")
    base = os.environ.get("IZO_BENCH_ROOT", "/var/tmp")
    for need in (IZO, args.w1, args.w2):
        if not os.path.exists(need):
            sys.exit(f"bench: {need} missing (bench/run builds izo and W1/W2)")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (FUSE mounts, sshd, drop_caches)")
    names = sp.run(["tar", "tf", args.w1] + args.w1_sub, capture_output=True, text=True, check=True).stdout.split()
    args.w1_entries = len([x for x in names if x.rstrip("/") not in (".", "")])

    CTX = Ctx(base)
    work = None

    def on_signal(sig, _frame):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signal.Signals(sig).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    rc = 0
    try:
        work = os.path.join(base, f"izo-suite.{os.getpid()}")
        os.makedirs(work)
        print(f"sizes: W1{' ' + ' '.join(args.w1_sub) if args.w1_sub else ''} ({args.w1_entries:,} entries), "
              f"W2 {args.w2_bytes >> 20} MiB, metadata {args.meta:,} files, propagation {args.prop} samples "
              f"(peers {args.prop_peer}), memory {args.mem_files:,} files, runs {args.runs}, "
              f"timeout {args.timeout:.0f} s per step", flush=True)
        for group, fn in (("tree", w_tree), ("w2", w_w2), ("meta", w_meta), ("repl", w_repl), ("mem", w_mem)):
            if group in args.only:
                t0 = now()
                log(f"== {group}")
                gw = os.path.join(work, group)
                os.makedirs(gw)
                try:
                    fn(args, gw)
                except Interrupted:
                    raise
                except Exception as e:  # noqa: BLE001 - one workload's failure does not stop the suite
                    R.note(f"workload {group} stopped: {type(e).__name__}: {e}")
                    if os.environ.get("IZO_BENCH_TRACE"):
                        traceback.print_exc()
                finally:
                    CTX.cleanup()
                    rmrf(gw)
                log(f"== {group} done in {now() - t0:.0f} s")
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        rc = 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        CTX.cleanup()
        if work:
            rmrf(work)
    print()
    print("Median of the runs; (×) = ratio to native in the same run (for s, ms: lower is better; for MB/s, "
          "IOPS: higher is better); — = not applicable; n/a (why) = could not run.")
    print()
    print(table(args))
    print()
    print("Targets (from this run):")
    print()
    print(targets(args))
    if R.notes:
        print()
        print("Notes:")
        for n in R.notes:
            print(f"- {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"values": {f"{k[0]}/{k[1]}": v for k, v in R.vals.items()},
                       "failures": {f"{k[0]}/{k[1]}": v for k, v in R.fails.items()}, "notes": R.notes}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
